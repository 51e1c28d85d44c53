/**
 * Sliding windows of one-second buckets for rollback triggers and triage (SPEC §7, §11):
 * requests, errors and a latency histogram per second, in preallocated typed arrays. Recording
 * is O(1) and allocates nothing; merging a window happens at evaluation, once a second.
 *
 * Latency bins are logarithmic, four per power of two of milliseconds (about 19 % wide), from
 * under 1 ms to over a minute; a p99 is interpolated inside its bin.
 */

/** Seconds of history kept: the longest trigger window plus triage's 30-minute baseline. */
export const HISTORY_SECONDS = 3900
export const LATENCY_BINS = 72

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

export class SecondWindow {
  private readonly seconds = new Float64Array(HISTORY_SECONDS)
  private readonly requests = new Float64Array(HISTORY_SECONDS)
  private readonly errors = new Float64Array(HISTORY_SECONDS)
  private readonly latency = new Uint32Array(HISTORY_SECONDS * LATENCY_BINS)

  private bucket (second: number): number {
    const i = second % HISTORY_SECONDS
    if (this.seconds[i] !== second) {
      this.seconds[i] = second
      this.requests[i] = 0
      this.errors[i] = 0
      this.latency.fill(0, i * LATENCY_BINS, (i + 1) * LATENCY_BINS)
    }
    return i
  }

  /** One request's outcome. `latencyMs < 0` records no latency (a refusal). */
  record (nowMs: number, error: boolean, latencyMs: number): void {
    const i = this.bucket((nowMs / 1000) | 0)
    this.requests[i]++
    if (error) this.errors[i]++
    if (latencyMs >= 0) this.latency[i * LATENCY_BINS + latencyBin(latencyMs)]++
  }

  /**
   * Add the seconds in [fromSec, toSec) into `into` (so scopes can merge several windows).
   */
  sum (fromSec: number, toSec: number, into: WindowSums): WindowSums {
    const lat = into.latency
    for (let s = Math.max(fromSec, toSec - HISTORY_SECONDS); s < toSec; s++) {
      const i = s % HISTORY_SECONDS
      if (this.seconds[i] !== s) continue
      into.requests += this.requests[i] as number
      into.errors += this.errors[i] as number
      if (lat !== null) {
        const base = i * LATENCY_BINS
        for (let b = 0; b < LATENCY_BINS; b++) lat[b] = (lat[b] as number) + (this.latency[base + b] as number)
      }
    }
    return into
  }
}

export function emptySums (withLatency: boolean): WindowSums {
  return { requests: 0, errors: 0, latency: withLatency ? new Float64Array(LATENCY_BINS) : null }
}

/** The q-quantile (0–1) in ms of a merged histogram, or null when it is empty. */
export function quantile (latency: Float64Array, q: number): number | null {
  let total = 0
  for (let b = 0; b < LATENCY_BINS; b++) total += latency[b] as number
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
