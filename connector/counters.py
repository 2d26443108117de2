"""Per-interval counters of the connector's two sides (scheduler and worker): vLLM
takes them once a step and each take starts a fresh interval."""

from __future__ import annotations


class Counters:
    """Base of a ``@dataclass(slots=True)`` of int and float counters."""

    __slots__ = ()

    def take(self) -> dict[str, float]:
        """The counters of the interval now ending, each then reset to zero."""
        names: tuple[str, ...] = self.__slots__  # the dataclass's fields, not this ()
        out: dict[str, float] = {k: getattr(self, k) for k in names}
        for k in names:
            setattr(self, k, type(out[k])())
        return out


__all__ = ["Counters"]
