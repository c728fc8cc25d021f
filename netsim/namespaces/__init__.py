"""OS networking: hosts as network namespaces (:mod:`.netns`) or Mininet hosts (:mod:`.mininet`).

:mod:`.plan` computes, purely, the command lines (:mod:`.commands`) that :mod:`.executor`
runs; :mod:`.wire` is the userspace delay daemon (``python -m netsim.namespaces.wire``,
standard library only) around the pure scheduler of :mod:`.wire_core`. Needs root.
"""
