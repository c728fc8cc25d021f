"""The link model: what a network does to a message, computed without sending anything.

:mod:`.link` (one link: rate, latency, jitter, loss, optional trace), :mod:`.trace`
(bandwidth over time), :mod:`.topo` (hosts, pairs and shared links), :mod:`.reserve` (the
reservation rule concurrent messages share a link by), :mod:`.cost` (closed-form times of
point-to-point messages and collectives) and :mod:`.clock` (virtual and wall clocks).
The other layers build on these; nothing here imports them.
"""
