"""The probe agent's command line (`netsim.probe.agent`), without a network or torch."""
from __future__ import annotations

import pytest

from netsim.probe import agent


def test_gloo_sweep_names_a_bad_op() -> None:
    with pytest.raises(SystemExit) as exc:
        agent.main(["gloo-sweep", "--ops", "allreduce,broadcast", "--bytes", "4"])
    assert exc.value.code == 2  # argparse's usage error, before any process group is set up
