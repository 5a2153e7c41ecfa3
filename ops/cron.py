"""A minimal cron expression parser for the scheduler (`scheduler.cron = "*/5 * * * *"`).

Supported subset (five fields: minute hour day-of-month month day-of-week, UTC):

    *        every value
    N        one value                      e.g. "30"
    A-B      a range                        e.g. "9-17"
    */S      every S-th value from the min  e.g. "*/5"
    A-B/S    every S-th value of a range    e.g. "0-30/10"
    X,Y,...  a list of any of the above     e.g. "0,15,45"

Day of week is 0-6 with 0 = Sunday (7 is accepted as Sunday too). No names (MON, JAN), no
``@hourly`` macros, no ``L``/``W``/``#``. As in classic cron, when both day-of-month and
day-of-week are restricted a time matches if *either* matches.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day-of-month", 1, 31), ("month", 1, 12), ("day-of-week", 0, 7))


class CronError(ValueError):
    """A cron expression outside the supported subset; the message names the field."""


def _parse_field(text: str, name: str, lo: int, hi: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise CronError(f"cron {name} field {text!r}: empty list item")
        rng, _, step_s = part.partition("/")
        step = 1
        if step_s:
            if not step_s.isdigit() or int(step_s) == 0:
                raise CronError(f"cron {name} field {text!r}: step must be a positive integer")
            step = int(step_s)
        if rng == "*":
            a, b = lo, hi
        elif "-" in rng:
            a_s, _, b_s = rng.partition("-")
            if not (a_s.isdigit() and b_s.isdigit()):
                raise CronError(f"cron {name} field {text!r}: bad range {rng!r}")
            a, b = int(a_s), int(b_s)
        elif rng.isdigit():
            a = b = int(rng)
            if step_s:  # "5/15" means "5-max/15"
                b = hi
        else:
            raise CronError(f"cron {name} field {text!r}: unsupported syntax {rng!r}")
        if not (lo <= a <= hi and lo <= b <= hi) or a > b:
            raise CronError(f"cron {name} field {text!r}: values must be within {lo}-{hi}")
        values.update(range(a, b + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class Cron:
    expr: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    dom_restricted: bool
    dow_restricted: bool

    @classmethod
    def parse(cls, expr: str) -> "Cron":
        parts = expr.split()
        if len(parts) != 5:
            raise CronError(f"cron {expr!r}: expected 5 fields (minute hour day-of-month month day-of-week)")
        sets = [_parse_field(p, name, lo, hi) for p, (name, lo, hi) in zip(parts, _FIELDS)]
        weekdays = frozenset(d % 7 for d in sets[4])
        return cls(expr, sets[0], sets[1], sets[2], sets[3], weekdays,
                   dom_restricted=parts[2] != "*", dow_restricted=parts[4] != "*")

    def matches(self, t: datetime) -> bool:
        return (t.minute in self.minutes and t.hour in self.hours and t.month in self.months
                and self._day_ok(t))

    def next_after(self, t: datetime) -> datetime:
        """The first matching minute strictly after ``t`` (UTC if ``t`` is naive)."""
        if t.tzinfo is None:
            t = t.replace(tzinfo=timezone.utc)
        c = t.replace(second=0, microsecond=0) + timedelta(minutes=1)
        horizon = c + timedelta(days=4 * 366 + 1)  # every calendar pattern repeats within a leap cycle
        # Skip whole days and hours that cannot match, so even "0 0 29 2 *" is found quickly.
        while c <= horizon:
            if c.month not in self.months or not self._day_ok(c):
                c = (c + timedelta(days=1)).replace(hour=0, minute=0)
                continue
            if c.hour not in self.hours:
                c = (c + timedelta(hours=1)).replace(minute=0)
                continue
            if c.minute in self.minutes:
                return c
            c += timedelta(minutes=1)
        raise CronError(f"cron {self.expr!r} never matches")  # e.g. "0 0 31 2 *"

    def _day_ok(self, t: datetime) -> bool:
        dom_ok = t.day in self.days
        dow_ok = (t.isoweekday() % 7) in self.weekdays
        if self.dom_restricted and self.dow_restricted:
            return dom_ok or dow_ok
        return dom_ok and dow_ok
