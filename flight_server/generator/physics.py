"""Shot-by-shot physics shared by all layouts: time stamps, beam, ion TOF and detector frames.

Each quantity draws from its own random stream keyed by (seed, run, name). Streams are consumed
in event order, so values do not depend on how a writer splits a run into blocks, and changing
one quantity (say the waveform length) leaves every other one unchanged.

The physics is simple but the correlations are real, so that demos and tests can find them:
ion yields and Bragg spot intensities grow with the pulse energy of the same shot, and peak
lists describe exactly the spots drawn on the frame.
"""

import functools
import zlib
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

EVENT_RATE_HZ = 120
NS_PER_S = 1_000_000_000
UNIX_AT_1990 = 631_152_000
"""Unix seconds at 1990-01-01 00:00:00 UTC, the epoch of LCLS2 time stamps."""
RUN_SPACING_S = 3600
"""Runs of one experiment start an hour apart, so their time ranges never overlap."""

FIDUCIAL_STEP = 3
"""LCLS fiducials count at 360 Hz, so consecutive 120 Hz shots differ by 3."""
FIDUCIAL_WRAP = 131_040
"""LCLS fiducials wrap at 0x1FFE0."""

SPOT_PATCH = 7
"""Side of the square patch a Bragg spot is drawn into (pixels)."""
SPOT_MARGIN = SPOT_PATCH // 2 + 1
MIN_SPOT_INTENSITY = 800.0
"""Integrated intensity floor: even the weakest spot peaks well above the detector noise."""


def stream(seed: int, run: int, name: str) -> np.random.Generator:
    """An independent, reproducible random stream for one quantity of one run."""
    return np.random.default_rng(np.random.SeedSequence([seed, run, zlib.crc32(name.encode())]))


# --- time -------------------------------------------------------------------------------------


def event_unix_ns(start_unix: float, n_events: int) -> np.ndarray:
    """Unix nanoseconds of ``n_events`` shots at 120 Hz, exact in integer arithmetic."""
    whole = int(np.floor(start_unix))
    start_ns = whole * NS_PER_S + round((start_unix - whole) * NS_PER_S)
    return start_ns + (np.arange(n_events, dtype=np.int64) * NS_PER_S) // EVENT_RATE_HZ


def pack_time(unix_ns: np.ndarray, epoch_unix: int = 0) -> np.ndarray:
    """Encode as the facilities do: ``(seconds since epoch) << 32 | nanoseconds``, int64."""
    seconds = unix_ns // NS_PER_S - epoch_unix
    return (seconds << 32) | (unix_ns % NS_PER_S)


def fiducials(rng: np.random.Generator, n_events: int) -> np.ndarray:
    """LCLS1 360 Hz fiducials of consecutive 120 Hz shots, wrapping like the real counter."""
    first = int(rng.integers(0, FIDUCIAL_WRAP // FIDUCIAL_STEP)) * FIDUCIAL_STEP
    steps = np.arange(n_events, dtype=np.int64) * FIDUCIAL_STEP
    return ((first + steps) % FIDUCIAL_WRAP).astype(np.int32)


# --- beam -------------------------------------------------------------------------------------


def pulse_energy_mj(rng: np.random.Generator, n_events: int, mean_mj: float = 1.5) -> np.ndarray:
    """SASE pulse energies: gamma distributed (a few longitudinal modes) with a slow drift."""
    modes = 12.0
    drift = 1.0 + 0.08 * np.sin(np.arange(n_events) * (2 * np.pi / 1800.0))
    return rng.gamma(modes, mean_mj / modes, n_events) * drift


def photon_energy_ev(
    rng: np.random.Generator, n_events: int, centre_ev: float, jitter_ev: float
) -> np.ndarray:
    """Photon energies: shot-to-shot jitter on top of a slow electron-energy wander."""
    wander = 0.3 * jitter_ev * np.sin(np.arange(n_events) * (2 * np.pi / 2400.0) + 1.0)
    return centre_ev + wander + jitter_ev * rng.standard_normal(n_events)


def with_missing_float(values: np.ndarray, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """Copy with ``fraction`` of entries NaN: shots where a diagnostic reported nothing."""
    out = values.astype(np.float64, copy=True)
    out[missing_mask(len(out), rng, fraction)] = np.nan
    return out


def with_missing_int(
    values: np.ndarray, rng: np.random.Generator, fraction: float, sentinel: int = -99999
) -> np.ndarray:
    """Copy with ``fraction`` of entries set to the sentinel psana uses for missing integers."""
    out = values.astype(np.int64, copy=True)
    out[missing_mask(len(out), rng, fraction)] = sentinel
    return out


def missing_mask(n: int, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """Exactly round(fraction * n) missing shots (at least one in any run of 10 or more), so
    every generated run exercises the missing-value path."""
    count = max(round(fraction * n), 1 if n >= 10 else 0)
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=count, replace=False)] = True
    return mask


# --- ion time of flight -----------------------------------------------------------------------


@dataclass(frozen=True)
class IonSpecies:
    """An ion seen by the TOF spectrometer; arrival time goes as sqrt(mass / charge)."""

    name: str
    mass_to_charge: float
    volts_per_mj: float
    order: float
    """Intensity scales as pulse_energy ** order (multi-photon ionisation)."""


SPECIES: tuple[IonSpecies, ...] = (
    IonSpecies("H+", 1.0, 0.060, 2.0),
    IonSpecies("C+", 12.0, 0.035, 1.0),
    IonSpecies("N+", 14.0, 0.080, 1.5),
    IonSpecies("O+", 16.0, 0.045, 1.5),
    IonSpecies("N2+", 28.0, 0.150, 1.0),
)
TOF_SAMPLE_PERIOD_NS = 2.0
TOF_BASELINE_V = 0.005
TOF_NOISE_V = 0.002
TOF_CHANNEL_GAIN = (1.0, 0.6)
TOF_CHANNEL_DELAY = (0.0, 0.012)
"""Second digitizer channel: a weaker, slightly later detector (fraction of the window)."""


def tof_arrival_samples(samples: int, channel: int = 0) -> np.ndarray:
    """Peak centre of each species in samples: t = t0 + k * sqrt(m/q), scaled to the window."""
    mq = np.array([s.mass_to_charge for s in SPECIES])
    return samples * (0.08 + TOF_CHANNEL_DELAY[channel] + 0.155 * np.sqrt(mq))


def tof_profiles(samples: int, channels: int) -> np.ndarray:
    """Unit-height peak shapes, (channels, species, samples): heavier ions arrive broader."""
    t = np.arange(samples, dtype=np.float64)
    mq = np.array([s.mass_to_charge for s in SPECIES])
    width = 1.0 + samples * 0.0015 * np.sqrt(mq)
    out = np.empty((channels, len(SPECIES), samples), dtype=np.float32)
    for c in range(channels):
        centre = tof_arrival_samples(samples, c % len(TOF_CHANNEL_GAIN))
        out[c] = np.exp(-0.5 * ((t[None, :] - centre[:, None]) / width[:, None]) ** 2)
    return out


def tof_heights(rng: np.random.Generator, pulse_mj: np.ndarray, channels: int) -> np.ndarray:
    """Peak heights (events, channels, species) in volts, with ~10% ionisation noise."""
    yields = np.array([s.volts_per_mj for s in SPECIES])
    order = np.array([s.order for s in SPECIES])
    gain = np.array([TOF_CHANNEL_GAIN[c % len(TOF_CHANNEL_GAIN)] for c in range(channels)])
    base = yields[None, :] * np.clip(pulse_mj, 0.0, None)[:, None] ** order[None, :]
    noise = 1.0 + 0.1 * rng.standard_normal((len(pulse_mj), channels, len(SPECIES)))
    return (base[:, None, :] * gain[None, :, None] * np.clip(noise, 0.0, None)).astype(np.float32)


def tof_waveforms(
    noise_rng: np.random.Generator, heights: np.ndarray, profiles: np.ndarray
) -> np.ndarray:
    """Digitizer traces (events, channels, samples) float32: baseline + noise + ion peaks."""
    n, channels, _ = heights.shape
    samples = profiles.shape[-1]
    out = noise_rng.standard_normal((n, channels, samples), dtype=np.float32)
    out *= TOF_NOISE_V
    out += TOF_BASELINE_V
    # (channels, events, species) @ (channels, species, samples) -> (channels, events, samples)
    out += np.matmul(heights.transpose(1, 0, 2), profiles).transpose(1, 0, 2)
    return out


# --- area detector ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Spots:
    """Bragg spots of a run, flat in event order: what a peak finder would report."""

    counts: np.ndarray
    """Spots per event, int64 (events,)."""
    x: np.ndarray
    """Column of the spot centre in pixels (pixel centres at integers), float32."""
    y: np.ndarray
    """Row of the spot centre in pixels, float32."""
    sigma: np.ndarray
    intensity: np.ndarray
    """Integrated intensity above background (detector units), float32."""

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)


def spot_counts(
    rng: np.random.Generator,
    n_events: int,
    hit_fraction: float,
    min_spots: int,
    mean_spots: float,
    max_spots: int,
    miss_max: int = 0,
) -> np.ndarray:
    """Spots per shot: hits carry ``min_spots..max_spots``, misses ``0..miss_max``."""
    hit = rng.random(n_events) < hit_fraction
    on_hit = min_spots + rng.poisson(max(mean_spots - min_spots, 0.0), n_events)
    on_miss = rng.integers(0, miss_max + 1, n_events)
    return np.where(hit, np.clip(on_hit, min_spots, max_spots), on_miss).astype(np.int64)


def draw_spots(
    rng: np.random.Generator,
    counts: np.ndarray,
    pulse_mj: np.ndarray,
    frame_shape: tuple[int, int],
    mean_pulse_mj: float = 1.5,
) -> Spots:
    """Place spots away from the edges, brighter on stronger shots."""
    h, w = frame_shape
    total = int(counts.sum())
    pulse = np.repeat(np.clip(pulse_mj, 0.0, None) / mean_pulse_mj, counts)
    x = rng.uniform(SPOT_MARGIN, w - 1 - SPOT_MARGIN, total)
    y = rng.uniform(SPOT_MARGIN, h - 1 - SPOT_MARGIN, total)
    sigma = rng.uniform(0.8, 1.5, total)
    bright = rng.lognormal(np.log(1500.0), 0.8, total)
    intensity = MIN_SPOT_INTENSITY + np.minimum(pulse * bright, 2.0e5)
    f32 = np.float32
    return Spots(counts, x.astype(f32), y.astype(f32), sigma.astype(f32), intensity.astype(f32))


def ring_profile(frame_shape: tuple[int, int]) -> np.ndarray:
    """Diffuse solvent ring (per mJ of pulse energy) that every shot shows, hit or not."""
    h, w = frame_shape
    rows = np.arange(h, dtype=np.float32)[:, None] - (h - 1) / 2
    cols = np.arange(w, dtype=np.float32)[None, :] - (w - 1) / 2
    r = np.sqrt(rows**2 + cols**2)
    scale = min(h, w)
    return (np.exp(-0.5 * ((r - 0.35 * scale) / (0.06 * scale)) ** 2)).astype(np.float32)


@functools.cache
def _normal_quantiles() -> np.ndarray:
    """Standard normal quantiles at 65536 equiprobable points (tails cut at about 4.3 sigma)."""
    dist = NormalDist()
    upper = np.array([dist.inv_cdf((i + 0.5) / 65536) for i in range(32768, 65536)])
    return np.concatenate([-upper[::-1], upper]).astype(np.float32)


def gaussian_noise(
    rng: np.random.Generator, n_events: int, pixels: int, sigma: float, mean: float
) -> np.ndarray:
    """Gaussian read noise (events, pixels) float32, about three times faster than
    ``standard_normal``: one 16-bit draw per pixel mapped through a quantile table.

    Each event consumes a fixed number of 32-bit draws, so the noise of an event does not
    depend on how the run is split into write blocks.
    """
    table = _normal_quantiles() * np.float32(sigma) + np.float32(mean)
    words = (pixels + 1) // 2
    draws = rng.integers(0, 1 << 32, (n_events, words), dtype=np.uint32)
    return table[draws.view(np.uint16)[:, :pixels]]


def render_frames(
    noise_rng: np.random.Generator,
    frame_shape: tuple[int, int],
    pulse_mj: np.ndarray,
    spots: Spots,
    first_event: int,
    pedestal: float,
    noise_sigma: float,
    ring_per_mj: float,
) -> np.ndarray:
    """Frames (events, H, W) float32 for events ``first_event .. first_event + len(pulse_mj)``.

    Spots are rendered as normalised 2D gaussians so each spot's pixels sum to its listed
    intensity; all spots of the block are accumulated with one unbuffered ``np.add.at``.
    """
    h, w = frame_shape
    n = len(pulse_mj)
    frames = gaussian_noise(noise_rng, n, h * w, noise_sigma, pedestal).reshape(n, h, w)
    frames += np.clip(pulse_mj, 0.0, None).astype(np.float32)[:, None, None] * (
        ring_per_mj * ring_profile(frame_shape)
    )
    offsets = spots.offsets
    lo, hi = offsets[first_event], offsets[first_event + n]
    if hi > lo:
        event = np.repeat(np.arange(n), spots.counts[first_event : first_event + n])
        x = spots.x[lo:hi].astype(np.float64)
        y = spots.y[lo:hi].astype(np.float64)
        s = spots.sigma[lo:hi].astype(np.float64)
        d = np.arange(SPOT_PATCH) - SPOT_PATCH // 2
        cols = np.rint(x)[:, None].astype(np.int64) + d
        rows = np.rint(y)[:, None].astype(np.int64) + d
        gx = np.exp(-0.5 * ((cols - x[:, None]) / s[:, None]) ** 2)
        gy = np.exp(-0.5 * ((rows - y[:, None]) / s[:, None]) ** 2)
        norm = spots.intensity[lo:hi] / (gx.sum(axis=1) * gy.sum(axis=1))
        weights = gy[:, :, None] * gx[:, None, :] * norm[:, None, None]
        index = ((event[:, None] * h + rows)[:, :, None]) * w + cols[:, None, :]
        np.add.at(frames.reshape(-1), index.ravel(), weights.ravel().astype(np.float32))
    return frames


def to_uint16(frames: np.ndarray) -> np.ndarray:
    """Round and saturate like an ADC: integer ADU in 0..65535."""
    frames += 0.5
    np.clip(frames, 0.0, 65535.0, out=frames)
    return frames.astype(np.uint16)
