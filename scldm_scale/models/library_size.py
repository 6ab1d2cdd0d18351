"""Library size for generation: log-normal fits of total counts per condition.

Fitted on the training cells: log L ~ N(mean, std) globally, per value of each condition key, and per
observed combination of all keys. Sampling uses the most specific fit available for the request:
the full combination (when every key is given and the combination has MIN_CELLS cells), else the first
requested key in config order, else the global fit.
"""

from __future__ import annotations

import numpy as np

MIN_CELLS = 3  # fewer cells give no usable std; fall back to a coarser fit
_SEP = "\x1f"  # joins condition values into a combination key


def _fit(log_sizes: np.ndarray) -> tuple[float, float]:
    return float(log_sizes.mean()), float(log_sizes.std(ddof=1)) if log_sizes.size > 1 else 0.0


class LibrarySizeModel:
    def __init__(self, keys: list[str], fits: dict[str, dict[str, tuple[float, float]]]):
        self.keys = list(keys)
        self.fits = fits  # scope ("__global__", a key, "__combination__") -> value -> (mean, std)

    @classmethod
    def fit(cls, library_sizes: np.ndarray, labels: dict[str, np.ndarray]) -> LibrarySizeModel:
        log_sizes = np.log(np.asarray(library_sizes, dtype=np.float64))
        keys = list(labels)
        fits: dict[str, dict[str, tuple[float, float]]] = {"__global__": {"": _fit(log_sizes)}}
        for key in keys:
            values = labels[key]
            fits[key] = {v: _fit(log_sizes[values == v]) for v in np.unique(values) if (values == v).sum() >= MIN_CELLS}
        if keys:
            combos = np.array([_SEP.join(parts) for parts in zip(*(labels[k] for k in keys), strict=True)])
            fits["__combination__"] = {
                c: _fit(log_sizes[combos == c]) for c in np.unique(combos) if (combos == c).sum() >= MIN_CELLS
            }
        return cls(keys, fits)

    def params(self, condition: dict[str, str]) -> tuple[float, float]:
        if self.keys and all(k in condition for k in self.keys):
            combo = _SEP.join(condition[k] for k in self.keys)
            if combo in self.fits["__combination__"]:
                return self.fits["__combination__"][combo]
        for key in self.keys:
            if key in condition and condition[key] in self.fits[key]:
                return self.fits[key][condition[key]]
        return self.fits["__global__"][""]

    def sample(self, n: int, condition: dict[str, str], rng: np.random.Generator) -> np.ndarray:
        mean, std = self.params(condition)
        return np.exp(rng.normal(mean, std, size=n))

    def state_dict(self) -> dict:
        return {
            "keys": self.keys,
            "fits": {s: {v: list(p) for v, p in f.items()} for s, f in self.fits.items()},
        }

    @classmethod
    def from_state(cls, state: dict) -> LibrarySizeModel:
        fits = {s: {v: tuple(p) for v, p in f.items()} for s, f in state["fits"].items()}
        return cls(state["keys"], fits)
