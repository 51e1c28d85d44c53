/**
 * Per-request counters kept as plain numbers on the hot path and read by the metrics
 * registry at scrape time (a prom-client labelled observe costs about 1 µs; an array
 * increment costs nothing measurable). One `RouteStats` per route and upstream pair,
 * created when config loads and kept across reloads so counters stay monotonic; a reload that
 * removes a route frees its stats.
 */

import { SecondWindow } from './window.js'
import type { Source } from './context.js'

/** Upper bounds in seconds of the request duration histogram. */
export const DURATION_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30] as const

export class RouteStats {
  readonly route: string
  readonly upstream: string
  /** Per-second requests, errors and latency, for triggers and triage. */
  readonly window = new SecondWindow()
  /** Responses by status code (index = code) whose status the upstream produced... */
  readonly upstreamCodes = new Float64Array(600)
  /** ...and those Breakwater produced (local answers, and 499 for a client that left). */
  readonly localCodes = new Float64Array(600)
  /** Non-cumulative bucket counts; the last slot is +Inf. */
  readonly buckets = new Float64Array(DURATION_BUCKETS.length + 1)
  sum = 0
  count = 0
  /** Refusals by reason (`kill_switch`, `circuit_open`, `bulkhead`, `rate_limit`). */
  readonly rejections = new Map<string, number>()
  retries = 0
  retryBudgetExhausted = 0
  faultsAborted = 0
  faultsDelayed = 0
  /** Degraded answers served instead of a refusal or failure, by kind (SPEC §17). */
  readonly fallbacks = { stale: 0, static: 0 }
  /**
   * Responses cut after the upstream's head went out (the body broken off or stalled), by
   * `status\u0000error`: counted under their head's status above, so a 200 that never ended
   * needs this count to read as the failure it was.
   */
  readonly cuts = new Map<string, number>()

  constructor (route: string, upstream: string) {
    this.route = route
    this.upstream = upstream
  }

  /** One finished request: its status, by who produced it, and its duration. */
  record (status: number, seconds: number, source: Source): void {
    const codes = source === 'upstream' ? this.upstreamCodes : this.localCodes
    codes[status < 600 && status >= 100 ? status : 599]++
    let i = 0
    while (i < DURATION_BUCKETS.length && seconds > (DURATION_BUCKETS[i] as number)) i++
    this.buckets[i]++
    this.sum += seconds
    this.count++
  }

  /**
   * An outcome for the trigger windows (SPEC §7, §15; context.ts decides which are recorded):
   * `error` is an `upstream` cause or a refusal by a circuit that failures opened; `latencyMs`
   * is the time to the response head, or -1 for a refusal. Client departures and refusals by
   * kill switches, forced circuits and bulkheads are never recorded: a mitigation must not
   * keep its own trigger firing, and a client must not move it either way. Nor are the
   * verifier's own probes: they are not users' traffic. `nowMs`: the window clock (window.ts).
   */
  outcome (nowMs: number, error: boolean, latencyMs: number): void {
    this.window.record(nowMs, error, latencyMs)
  }

  /** A response whose head the upstream sent and whose body it then cut (`upstream_reset`) or stalled (`upstream_timeout`). */
  cut (status: number, error: 'upstream_reset' | 'upstream_timeout'): void {
    const key = `${status}\u0000${error}`
    this.cuts.set(key, (this.cuts.get(key) ?? 0) + 1)
  }

  fault (type: 'abort' | 'delay'): void {
    if (type === 'abort') this.faultsAborted++
    else this.faultsDelayed++
  }

  reject (reason: string): void {
    this.rejections.set(reason, (this.rejections.get(reason) ?? 0) + 1)
  }
}

/** Counters of the data plane that are not per route. */
export class DataPlaneStats {
  private readonly routes = new Map<string, RouteStats>()
  /** Requests refused before routing, by reason. */
  readonly overloaded = { max_in_flight: 0, max_connections: 0, event_loop_delay: 0 }
  /** Requests the HTTP parser refused, by code. */
  readonly clientErrors = new Map<string, number>()
  ejections = new Map<string, number>()
  /** Requests forwarded and not yet ended (the bulkheads count these per upstream). */
  inFlight = 0
  /** Requests whose small body is still being read before they are forwarded. */
  receiving = 0

  /** The stats for a route and upstream pair, created once. */
  route (route: string, upstream: string): RouteStats {
    const key = `${route}\u0000${upstream}`
    let stats = this.routes.get(key)
    if (stats === undefined) {
      stats = new RouteStats(route, upstream)
      this.routes.set(key, stats)
    }
    return stats
  }

  /**
   * Free the stats (and trigger windows) of routes a reload removed; `kept` are the current
   * routes'. Requests still running on a removed route write to an object nobody reads.
   */
  retain (kept: readonly RouteStats[]): void {
    const keep = new Set(kept)
    for (const [key, stats] of this.routes) if (stats.route !== '' && !keep.has(stats)) this.routes.delete(key)
  }

  allRoutes (): IterableIterator<RouteStats> {
    return this.routes.values()
  }

  clientError (code: string): void {
    this.clientErrors.set(code, (this.clientErrors.get(code) ?? 0) + 1)
  }

  ejection (upstream: string): void {
    this.ejections.set(upstream, (this.ejections.get(upstream) ?? 0) + 1)
  }
}
