/**
 * Sliding windows for rollback triggers, triage and verification (SPEC §7, §11, §15):
 * requests, errors and a latency histogram per route, in preallocated typed arrays at two
 * resolutions — the last 128 seconds by second, the last 64 minutes by minute — so memory per
 * route is fixed and small (57 KiB), whatever the windows configured. Recording is O(1)
 * and allocates nothing after a route's first request.
 *
 * Triggers read through a `RunningSum`: totals added when a second (or minute) completes and
 * subtracted when it leaves the window, so an evaluation costs the same for a 10-second and a
 * 1-hour window. Windows up to 126 s move by the second; longer ones by the minute (their span
 * is whole minutes, the current one included).
 *
 * Latency bins are logarithmic, four per power of two of milliseconds (about 19 % wide), from
 * under 1 ms to over a minute; a p99 is interpolated inside its bin.
 *
 * The windows run on a monotonic clock (`windowNowMs`), never on the wall clock: an NTP step or
 * a VM restore moves `Date.now()` by minutes or hours, and a window keyed on it would drop every
 * request whose second its ring already holds a later one of — blind through an outage — or
 * jump a trigger's `for` ahead. Wall-clock time only stamps what people read (`wallMsOf`).
 */

export const LATENCY_BINS = 72
/** Seconds kept at one-second resolution. */
export const SECOND_SLOTS = 128
/** Minutes kept at one-minute resolution: a 1-hour window plus room for a late evaluation. */
export const MINUTE_SLOTS = 64

/** When the process started, on the epoch scale: window times read like epoch milliseconds. */
const ORIGIN_MS = performance.timeOrigin

/**
 * The windows' clock: milliseconds on the epoch scale that never step (the process's start plus
 * the monotonic time since). Equal to `Date.now()` until the wall clock is stepped.
 */
export function windowNowMs (): number {
  return ORIGIN_MS + performance.now()
}

/** A `performance.now()` reading (the request path's one clock read) as a window time. */
export function windowMsAt (performanceNowMs: number): number {
  return ORIGIN_MS + performanceNowMs
}

/** A window time as the wall clock reads it now, to stamp what people read. */
export function wallMsOf (windowMs: number): number {
  return windowMs + Date.now() - windowNowMs()
}

/** A wall-clock time (one just stamped, or read back from a record) as a window time. */
export function windowMsOf (wallMs: number): number {
  return wallMs - Date.now() + windowNowMs()
}

/** Bin of a latency in milliseconds. */
export function latencyBin (ms: number): number {
  const b = (Math.log2(ms + 1) * 4) | 0
  return b < LATENCY_BINS ? b : LATENCY_BINS - 1
}

/** Lower and upper bound in ms of a bin. */
function binBounds (b: number): [number, number] {
  return [2 ** (b / 4) - 1, 2 ** ((b + 1) / 4) - 1]
}

export interface WindowSums {
  requests: number
  errors: number
  /** Merged latency histogram (only when asked for). */
  latency: Float64Array | null
}

/** One resolution: `slots` buckets of `unitSeconds` each, indexed by unit number modulo slots. */
class Ring {
  readonly stamp: Float64Array
  readonly requests: Uint32Array
  readonly errors: Uint32Array
  readonly latency: Uint32Array

  constructor (readonly slots: number) {
    this.stamp = new Float64Array(slots).fill(-1)
    this.requests = new Uint32Array(slots)
    this.errors = new Uint32Array(slots)
    this.latency = new Uint32Array(slots * LATENCY_BINS)
  }

  /** The slot of unit `u`, cleared when it held an older unit; -1 when it holds a newer one. */
  slot (u: number): number {
    const i = u % this.slots
    const held = this.stamp[i] as number
    if (held === u) return i
    if (held > u) return -1
    this.stamp[i] = u
    this.requests[i] = 0
    this.errors[i] = 0
    this.latency.fill(0, i * LATENCY_BINS, (i + 1) * LATENCY_BINS)
    return i
  }

  record (u: number, error: boolean, bin: number): void {
    const i = this.slot(u)
    if (i < 0) return
    this.requests[i]++
    if (error) this.errors[i]++
    if (bin >= 0) this.latency[i * LATENCY_BINS + bin]++
  }

  /** Add `sign` × unit `u` into `into`, if the ring still holds it. */
  add (u: number, into: WindowSums, sign: 1 | -1): void {
    const i = u % this.slots
    if (this.stamp[i] !== u) return
    into.requests += sign * (this.requests[i] as number)
    into.errors += sign * (this.errors[i] as number)
    const lat = into.latency
    if (lat === null) return
    const base = i * LATENCY_BINS
    for (let b = 0; b < LATENCY_BINS; b++) lat[b] = (lat[b] as number) + sign * (this.latency[base + b] as number)
  }

  bytes (): number {
    return this.stamp.byteLength + this.requests.byteLength + this.errors.byteLength + this.latency.byteLength
  }
}

export class SecondWindow {
  private seconds: Ring | null = null
  private minutes: Ring | null = null
  /** The newest second recorded (the seconds ring holds the SECOND_SLOTS before it). */
  private newest = -1

  /** One request's outcome. `latencyMs < 0` records no latency (a refusal). */
  record (nowMs: number, error: boolean, latencyMs: number): void {
    const second = Math.floor(nowMs / 1000)
    // Allocated at the first request, not per configured route; a reload that removes the
    // route drops its stats, window included.
    this.seconds ??= new Ring(SECOND_SLOTS)
    this.minutes ??= new Ring(MINUTE_SLOTS)
    const bin = latencyMs >= 0 ? latencyBin(latencyMs) : -1
    this.seconds.record(second, error, bin)
    this.minutes.record(Math.floor(second / 60), error, bin)
    if (second > this.newest) this.newest = second
  }

  /**
   * Add the seconds in [fromSec, toSec) into `into` (so scopes can merge several windows).
   * Seconds older than the seconds ring come from the minutes ring, in whole minutes: the
   * first partial minute is counted whole, a last partial minute not at all.
   */
  sum (fromSec: number, toSec: number, into: WindowSums): WindowSums {
    if (this.seconds === null || this.minutes === null || toSec <= fromSec) return into
    const oldestSecond = this.newest - SECOND_SLOTS + 1
    const split = fromSec >= oldestSecond ? fromSec : Math.min(Math.ceil(oldestSecond / 60) * 60, Math.floor(toSec / 60) * 60)
    if (split > fromSec) for (let m = Math.floor(fromSec / 60); m * 60 < split; m++) this.minutes.add(m, into, 1)
    for (let s = Math.max(split, fromSec); s < toSec; s++) this.seconds.add(s, into, 1)
    return into
  }

  /** Add `sign` × one unit (a second for unitSeconds 1, a minute for 60) into `into`. */
  addUnit (unitSeconds: 1 | 60, u: number, into: WindowSums, sign: 1 | -1): void {
    const ring = unitSeconds === 1 ? this.seconds : this.minutes
    ring?.add(u, into, sign)
  }

  /** Bytes held by the typed arrays (0 until the first request). */
  bytes (): number {
    return (this.seconds?.bytes() ?? 0) + (this.minutes?.bytes() ?? 0)
  }
}

/**
 * Running totals of one window over a set of `SecondWindow`s (a trigger's scope): each
 * completed unit is added once when it enters and subtracted once when it leaves, so a read
 * costs O(routes × bins) per unit elapsed, whatever the window's length. The totals are
 * rebuilt from the rings whenever the scope changes, a read comes too late to step, or once
 * per window length (so nothing can drift).
 */
export class RunningSum {
  readonly unitSeconds: 1 | 60
  /** Units in the window, the current (partial) one included. */
  readonly units: number
  private readonly completed: WindowSums
  /** The unit current at the last read (completed holds the units-1 before it); null before the first. */
  private current: number | null = null
  private sources: SecondWindow[] = []
  private stepsSinceRebuild = 0

  constructor (windowMs: number, withLatency: boolean) {
    const seconds = Math.max(1, Math.ceil(windowMs / 1000))
    this.unitSeconds = seconds <= SECOND_SLOTS - 2 ? 1 : 60
    this.units = Math.ceil(seconds / this.unitSeconds)
    this.completed = emptySums(withLatency)
  }

  /** The window ending at `nowMs` over `sources`, written into `into` (reset first). */
  read (sources: SecondWindow[], nowMs: number, into: WindowSums): WindowSums {
    const cur = Math.floor(nowMs / 1000 / this.unitSeconds)
    const slots = this.unitSeconds === 1 ? SECOND_SLOTS : MINUTE_SLOTS
    const sameScope = sources.length === this.sources.length && sources.every((s, i) => s === this.sources[i])
    if (this.current === null || !sameScope || cur < this.current || (cur - this.current) + this.units > slots || this.stepsSinceRebuild >= this.units) {
      this.rebuild(sources, cur)
    } else {
      for (let u = this.current; u < cur; u++) {
        for (const s of sources) {
          s.addUnit(this.unitSeconds, u, this.completed, 1)
          s.addUnit(this.unitSeconds, u - this.units + 1, this.completed, -1)
        }
        this.stepsSinceRebuild++
      }
      this.current = cur
    }
    copySums(this.completed, into)
    for (const s of sources) s.addUnit(this.unitSeconds, cur, into, 1)
    return into
  }

  private rebuild (sources: SecondWindow[], cur: number): void {
    resetSums(this.completed)
    for (let u = cur - this.units + 1; u < cur; u++) for (const s of sources) s.addUnit(this.unitSeconds, u, this.completed, 1)
    this.sources = [...sources]
    this.current = cur
    this.stepsSinceRebuild = 0
  }
}

export function emptySums (withLatency: boolean): WindowSums {
  return { requests: 0, errors: 0, latency: withLatency ? new Float64Array(LATENCY_BINS) : null }
}

function resetSums (s: WindowSums): void {
  s.requests = 0
  s.errors = 0
  s.latency?.fill(0)
}

function copySums (from: WindowSums, to: WindowSums): void {
  to.requests = from.requests
  to.errors = from.errors
  if (to.latency !== null) {
    if (from.latency === null) to.latency.fill(0)
    else to.latency.set(from.latency)
  }
}

/** How many latencies a histogram holds. */
export function samples (latency: Float64Array): number {
  let total = 0
  for (let b = 0; b < LATENCY_BINS; b++) total += latency[b] as number
  return total
}

/** The q-quantile (0–1) in ms of a merged histogram, or null when it is empty. */
export function quantile (latency: Float64Array, q: number): number | null {
  const total = samples(latency)
  if (total === 0) return null
  const rank = q * total
  let seen = 0
  for (let b = 0; b < LATENCY_BINS; b++) {
    const n = latency[b] as number
    if (n > 0 && seen + n >= rank) {
      const [lo, hi] = binBounds(b)
      return lo + (hi - lo) * Math.min(1, Math.max(0, (rank - seen) / n))
    }
    seen += n
  }
  return binBounds(LATENCY_BINS - 1)[1]
}
