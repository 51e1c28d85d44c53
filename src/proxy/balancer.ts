/**
 * Endpoint choice and passive ejection, per upstream.
 *
 * - Round robin (default) or least request by the power of two choices (Envoy's
 *   `LEAST_REQUEST` with `choice_count: 2`).
 * - Passive ejection, Linkerd's failure accrual: after `consecutiveFailures` (7) failures in a
 *   row (only `upstream` causes, SPEC §15: a client that leaves or sends what cannot be
 *   forwarded says nothing about the endpoint, and breaks no run either) an endpoint is ejected for a penalty that doubles on each ejection from `baseMs` (1 s)
 *   to `maxMs` (1 min), with jitter; when it expires the endpoint takes real traffic again
 *   as a probe, and one success clears its record.
 * - Panic (Envoy): when fewer than `panicThresholdPercent` (50 %) of endpoints are usable,
 *   ejection and health are ignored and all endpoints are used — failing a few requests beats
 *   failing them all.
 */
import { Pool } from '../undici.js'
import type { UpstreamConfig } from '../config/types.js'
import type { Cause } from './context.js'

export class Endpoint {
  readonly origin: string
  readonly pool: Pool
  inFlight = 0
  consecutiveFailures = 0
  ejections = 0
  /** `performance.now()` until which the endpoint is ejected; 0 when not ejected. */
  ejectedUntil = 0
  /** `performance.now()` when it was last ejected. */
  ejectedAt = Number.NEGATIVE_INFINITY
  /** Result of active health checks (true until checks say otherwise). */
  healthy = true
  /** `performance.now()` when the upstream last closed a pooled connection itself (see `upstreams.ts`). */
  peerClosedAt = Number.NEGATIVE_INFINITY

  constructor (origin: string, pool: Pool) {
    this.origin = origin
    this.pool = pool
  }
}

export interface BalancerEvents {
  onEject (upstream: string, endpoint: Endpoint, penaltyMs: number): void
}

export class Balancer {
  readonly upstream: string
  readonly endpoints: readonly Endpoint[]
  private readonly config: UpstreamConfig
  private readonly events: BalancerEvents
  private next = 0
  ejectionsTotal = 0

  constructor (config: UpstreamConfig, endpoints: readonly Endpoint[], events: BalancerEvents) {
    this.upstream = config.name
    this.config = config
    this.endpoints = endpoints
    this.events = events
  }

  /** The endpoint for the next request, or null when there is none. `avoid` is the one that just failed (retries). */
  pick (avoid: Endpoint | null = null): Endpoint | null {
    const all = this.endpoints
    const n = all.length
    if (n === 1) return all[0] as Endpoint
    const now = performance.now()
    let usable = 0
    for (let i = 0; i < n; i++) if (isUsable(all[i] as Endpoint, now)) usable++
    // Panic: too few usable endpoints to trust the signals; spread over all of them.
    const panic = usable * 100 < n * this.config.ejection.panicThresholdPercent || usable === 0
    if (this.config.balance === 'least_request') return this.pickP2C(now, panic, avoid)
    for (let tries = 0; tries < n; tries++) {
      const e = all[this.next++ % n] as Endpoint
      if (this.next >= 0x3fffffff) this.next = 0
      if (e !== avoid && (panic || isUsable(e, now))) return e
    }
    // No other endpoint will do. In panic every endpoint will, so a retry never goes back to
    // the one that just failed while another exists (Envoy's retry host predicate
    // `previous_hosts`); out of panic, the one that failed if it is still usable.
    if (avoid !== null && (panic || isUsable(avoid, now))) return avoid
    return all[this.next++ % n] as Endpoint
  }

  private pickP2C (now: number, panic: boolean, avoid: Endpoint | null): Endpoint {
    const all = this.endpoints
    const n = all.length
    // Two distinct endpoints at random (the second drawn from the other n-1), a few times
    // until both are usable; then the one with fewer requests in flight.
    for (let tries = 0; tries < 4; tries++) {
      const i = (Math.random() * n) | 0
      let j = (Math.random() * (n - 1)) | 0
      if (j >= i) j++
      const a = all[i] as Endpoint
      const b = all[j] as Endpoint
      const aOk = (panic || isUsable(a, now)) && a !== avoid
      const bOk = (panic || isUsable(b, now)) && b !== avoid
      if (aOk && bOk) return b.inFlight < a.inFlight ? b : a
      if (aOk) return a
      if (bOk) return b
    }
    // Few usable endpoints: take the least loaded usable one, else any but the one to avoid.
    let best: Endpoint | null = null
    for (const e of all) {
      if (e === avoid || (!panic && !isUsable(e, now))) continue
      if (best === null || e.inFlight < best.inFlight) best = e
    }
    return best ?? all.find((e) => e !== avoid) ?? (all[0] as Endpoint)
  }

  /**
   * An attempt at `endpoint` ended with `cause`: `ok` clears its record, `upstream` counts,
   * others say nothing. `answeredAt`: when its answer began (`performance.now()`), for a
   * response judged when it ended; an `ok` whose answer began before the endpoint's last
   * ejection says nothing of it since, and must not end that ejection (a long download from an
   * endpoint ejected meanwhile).
   */
  report (endpoint: Endpoint, cause: Cause, now: number, answeredAt = now): void {
    if (cause === 'client' || cause === 'breakwater') return
    if (cause === 'ok') {
      if (answeredAt < endpoint.ejectedAt) return
      if (endpoint.consecutiveFailures !== 0) {
        endpoint.consecutiveFailures = 0
        endpoint.ejections = 0
        endpoint.ejectedUntil = 0
      }
      return
    }
    endpoint.consecutiveFailures++
    // A probe after a penalty fails: eject again at once, with a longer penalty.
    const probeFailed = endpoint.ejections > 0 && endpoint.ejectedUntil !== 0 && endpoint.ejectedUntil <= now
    // A lone endpoint is never ejected: panic would send traffic to it anyway.
    if (this.endpoints.length === 1) return
    if (endpoint.consecutiveFailures >= this.config.ejection.consecutiveFailures || probeFailed) {
      if (endpoint.ejectedUntil > now) return // already ejected
      const { baseMs, maxMs } = this.config.ejection
      const penalty = Math.min(maxMs, baseMs * 2 ** Math.min(endpoint.ejections, 20))
      const jittered = penalty * (0.75 + Math.random() * 0.5)
      endpoint.ejections++
      endpoint.ejectedAt = now
      endpoint.ejectedUntil = now + jittered
      this.ejectionsTotal++
      this.events.onEject(this.upstream, endpoint, Math.round(jittered))
    }
  }

  /** Counts for metrics and state: ready, ejected, unhealthy. */
  states (now: number): { ready: number, ejected: number, unhealthy: number } {
    let ready = 0; let ejected = 0; let unhealthy = 0
    for (const e of this.endpoints) {
      if (!e.healthy) unhealthy++
      else if (e.ejectedUntil > now) ejected++
      else ready++
    }
    return { ready, ejected, unhealthy }
  }
}

function isUsable (e: Endpoint, now: number): boolean {
  return e.healthy && e.ejectedUntil <= now
}
