"""A generated world with a known warm-up ramp, a ramp-pressure episode and Microsoft capacity events.

Three sending IPs over five days from Monday 2026-11-16: two warm (198.51.100.10 and .11, ~750
messages a day each) and one warming (198.51.100.30, 60 → 960 messages, doubling daily).

* Tue 2026-11-17 13:00-17:00 UTC: Microsoft ``452 4.3.1`` on 30 % of tries from every IP
  (capacity event);
* Thu 2026-11-19 and Fri 2026-11-20: ``451 4.7.650`` (reputation) on 30 % of the warming IP's
  Microsoft tries, the day it stepped to 480 and 960 (ramp pressure);
* Fri 2026-11-20 13:00-17:00 UTC: the capacity event again, on every IP (both).

So the Microsoft verdicts per day are :data:`VERDICTS`; Google and the rest stay ``neither``.
"""

from __future__ import annotations

from datetime import date

from deferral_kit.sample import Episode, SendingIP, WorldConfig, generate

WARMING_IP = "198.51.100.30"
WARM_IPS = ("198.51.100.10", "198.51.100.11")
RAMP = (60, 120, 240, 480, 960)
VERDICTS = {
    date(2026, 11, 16): "neither",
    date(2026, 11, 17): "capacity_event",
    date(2026, 11, 18): "neither",
    date(2026, 11, 19): "ramp_pressure",
    date(2026, 11, 20): "both",
}


def config() -> WorldConfig:
    ips = (SendingIP(WARM_IPS[0], pool="transactional"), SendingIP(WARM_IPS[1], pool="transactional"),
           SendingIP(WARMING_IP, pool="warmup", ramp=RAMP))
    return WorldConfig(days=5, seed=3, messages_per_day=1500, sending_ips=ips, episodes=[
        Episode("ms-capacity", kind="capacity", providers=["microsoft"], probability=0.3, start="2026-11-17T13:00Z", end="2026-11-17T17:00Z"),
        Episode("ramp-reputation", kind="reputation", providers=["microsoft"], egress_ips=[WARMING_IP], probability=0.3,
                start="2026-11-19T00:00Z", end="2026-11-21T00:00Z"),
        Episode("ms-capacity-2", kind="capacity", providers=["microsoft"], probability=0.3, start="2026-11-20T13:00Z", end="2026-11-20T17:00Z"),
    ])


def world():
    return generate(config())
