/**
 * Stage: failover (SPEC §17, rung 3). While an upstream is unavailable — its circuit refuses
 * (open, or forced open), or it has no usable endpoint (every one ejected or failing its
 * health check) — its requests go to its `failover` upstream, whose own breaker and bulkhead
 * then apply. The decision is made per request, from the state the breaker stage would read,
 * so the first request that finds the circuit open goes to the failover instead of failing:
 * no extra failed request after the circuit opens.
 *
 * Hysteresis: traffic returns only once the upstream has been available for `failbackAfter`
 * (default 30 s), so a flapping upstream does not drag its traffic back and forth — unless the
 * failover is unavailable itself (its circuit refuses, or it has no usable endpoint) or has
 * failed as many answers in a row as passive ejection allows an endpoint (its
 * `ejection.consecutiveFailures`): then the traffic goes back at once, to the upstream that can
 * serve it. While
 * failed over, a half-open circuit still gets its one probe from real traffic (nothing else
 * could close it); the probe's success starts the failback clock.
 *
 * An operator may force a failover (`DataPlane.forceFailover`, for the `failover` mitigation)
 * to any upstream, configured or not; it holds until lifted, and survives reloads.
 */
import type { Logger } from 'pino'
import type { Upstream } from './upstreams.js'

export class Failover {
  /** The upstream whose traffic this decides. */
  readonly name: string
  /** Configured failover target and hysteresis; null target when only forced. */
  target: Upstream | null = null
  failbackAfterMs = 30_000
  /** An operator's forced target, by name (kept across reloads). */
  forcedTo: string | null = null
  forcedTarget: Upstream | null = null
  /** Failed over now (automatically). */
  active = false
  /** `performance.now()` since which the upstream has been available while failed over; 0 = not. */
  private availableSince = 0
  private readonly logger: Logger
  /** Times this upstream failed over automatically. */
  engagements = 0
  /** Requests the failover answered since traffic last went there, and how many failed (triage). */
  servedSince = 0
  failedSince = 0
  /**
   * The failover's answers that failed in a row since traffic last went there. A failover with
   * one endpoint and no breaker is never unavailable by its circuit or by ejection (a lone
   * endpoint is never ejected), so this is how its being down is seen.
   */
  private failedInRow = 0

  constructor (name: string, logger: Logger) {
    this.name = name
    this.logger = logger
  }

  /** Traffic goes elsewhere now (for `breakwater_failover_active`). */
  get engaged (): boolean {
    return this.forcedTarget !== null || this.active
  }

  /** Where the traffic goes now, when it goes elsewhere. */
  get to (): string | null {
    return this.forcedTarget?.name ?? (this.active ? this.target?.name ?? null : null)
  }

  /** A request the failover answered ended (context.ts): `failed` as the trigger windows count it. */
  served (failed: boolean): void {
    this.servedSince++
    if (failed) {
      this.failedSince++
      this.failedInRow++
    } else {
      this.failedInRow = 0
    }
  }

  /** Traffic starts going elsewhere: the failover's record starts again. */
  engage (): void {
    this.servedSince = 0
    this.failedSince = 0
    this.failedInRow = 0
  }

  /** The upstream that takes a request for `primary` now. */
  choose (primary: Upstream, now: number): Upstream {
    if (this.forcedTarget !== null) return this.forcedTarget
    const target = this.target
    if (target === null) return primary
    const available = isAvailable(primary, now)
    if (!this.active) {
      if (available) return primary
      this.active = true
      this.availableSince = 0
      this.engage()
      this.engagements++
      this.logger.warn({ event: 'failover_engaged', upstream: this.name, to: target.name, circuit: primary.circuit?.state }, 'upstream failed over')
      return target
    }
    if (!available) {
      this.availableSince = 0
      // Only a real request can close a half-open circuit: it takes the one probe slot.
      const circuit = primary.circuit
      return circuit !== null && circuit.forced === null && circuit.state === 'half-open' && circuit.admits() ? primary : target
    }
    if (this.availableSince === 0) this.availableSince = now
    // The hysteresis keeps a flapping upstream from dragging its traffic back and forth; it
    // never holds the traffic on a failover that is down itself while the upstream is available.
    // Down: unavailable, or failing as many answers in a row as would eject one of its endpoints.
    const targetDown = !isAvailable(target, now) || this.failedInRow >= target.config.ejection.consecutiveFailures
    if (now - this.availableSince < this.failbackAfterMs && !targetDown) return target
    this.active = false
    this.availableSince = 0
    this.logger.warn({ event: 'failover_lifted', upstream: this.name, from: target.name, afterMs: this.failbackAfterMs, ...(targetDown ? { why: 'failover unavailable' } : {}) }, 'upstream failed back')
    return primary
  }
}

/**
 * Available: its circuit (if any) is closed or forced closed, and at least one endpoint is
 * neither ejected nor failing its health check.
 */
function isAvailable (upstream: Upstream, now: number): boolean {
  const circuit = upstream.circuit
  if (circuit !== null && circuit.state !== 'closed') return false
  return hasUsableEndpoint(upstream, now)
}

/** At least one endpoint is neither ejected nor failing its health check. */
export function hasUsableEndpoint (upstream: Upstream, now: number): boolean {
  const endpoints = upstream.balancer.endpoints
  for (let i = 0; i < endpoints.length; i++) {
    const e = endpoints[i] as (typeof endpoints)[number]
    if (e.healthy && e.ejectedUntil <= now) return true
  }
  return false
}

/** Failover state by upstream name, carried across reloads (the hysteresis and forced targets survive). */
export class FailoverTable {
  private readonly states = new Map<string, Failover>()
  private upstreams: ReadonlyMap<string, Upstream> = new Map()

  constructor (private readonly logger: Logger) {}

  /**
   * Give each upstream its failover state (or none); called for every new runtime, and by
   * `force` (`reloaded` false: the operator's change logs itself). A reload that moves traffic
   * says so — `failover_lifted` when it takes an engaged failover away, `failover_engaged` when
   * it sends the traffic somewhere new — as the decision per request does; an upstream the
   * reload keeps keeps its `breakwater_failover_active` series, at 0 once nothing is engaged.
   */
  attach (upstreams: ReadonlyMap<string, Upstream>, reloaded = true): void {
    this.upstreams = upstreams
    for (const [name, state] of this.states) {
      if (upstreams.has(name)) continue
      if (state.forcedTo === null) {
        this.states.delete(name)
      } else if (state.target !== null || state.forcedTarget !== null) {
        // An operator's failover outlives a reload that removes its upstream, as a forced
        // circuit does: it is in force again when a reload brings the upstream back.
        state.target = null
        state.forcedTarget = null
        state.active = false
        this.logger.warn({ event: 'override_kept', upstream: name, failover: state.forcedTo }, 'forced failover kept: the reload removed its upstream; it is in force again if the upstream comes back')
      }
    }
    for (const upstream of upstreams.values()) {
      const { failover, failbackAfterMs } = upstream.config
      let state = this.states.get(upstream.name)
      if (failover === null && state === undefined) { upstream.failover = null; continue }
      if (state === undefined) {
        state = new Failover(upstream.name, this.logger)
        this.states.set(upstream.name, state)
      }
      const before = state.to
      const forcedBefore = state.forcedTarget
      state.target = failover === null ? null : upstreams.get(failover) ?? null
      if (state.target === null) state.active = false
      state.failbackAfterMs = failbackAfterMs
      state.forcedTarget = state.forcedTo === null ? null : upstreams.get(state.forcedTo) ?? null
      upstream.failover = state.target === null && state.forcedTo === null ? null : state
      if (!reloaded) continue
      if (state.forcedTo !== null && state.forcedTarget === null && forcedBefore !== null) {
        this.logger.warn({ event: 'override_kept', upstream: upstream.name, failover: state.forcedTo }, 'forced failover kept but not in force: the reload removed its target; it is in force again if the target comes back')
      }
      const after = state.to
      if (after === before) continue
      if (after !== null) state.engage()
      if (after === null) this.logger.warn({ event: 'failover_lifted', upstream: upstream.name, from: before, why: 'reload' }, 'upstream failed back: the reload took its failover away')
      else this.logger.warn({ event: 'failover_engaged', upstream: upstream.name, to: after, ...(before !== null ? { from: before } : {}), why: 'reload' }, 'upstream failed over: the reload changed where its traffic goes')
    }
  }

  /** Where an operator's forced failover of `name` sends its traffic now; null when none is in force (none, or its target is not configured). */
  forcedNow (name: string): string | null {
    return this.states.get(name)?.forcedTarget?.name ?? null
  }

  /**
   * Send `name`'s traffic to `to` until lifted (`null`); `to` defaults to the configured
   * failover. False when either upstream is unknown, or when `to` is `name` itself or there is
   * no target. Lifting always succeeds, also for an upstream a reload removed (its kept failover goes).
   */
  force (name: string, to: string | null | undefined): boolean {
    if (to === null) {
      const state = this.states.get(name)
      if (state !== undefined && state.forcedTo !== null) {
        state.forcedTo = null
        this.logger.warn({ event: 'failover_forced', upstream: name, to: null }, 'forced failover lifted')
        this.attach(this.upstreams, false)
      }
      return true
    }
    const upstream = this.upstreams.get(name)
    if (upstream === undefined) return false
    const target = to ?? upstream.config.failover
    if (target === null || target === name || !this.upstreams.has(target)) return false
    let state = this.states.get(name)
    if (state === undefined) {
      state = new Failover(name, this.logger)
      this.states.set(name, state)
    }
    if (state.forcedTo !== target) state.engage()
    state.forcedTo = target
    this.logger.warn({ event: 'failover_forced', upstream: name, to: target }, 'failover forced')
    this.attach(this.upstreams, false)
    return true
  }

  /** Every configured upstream with a failover state, for metrics and state. */
  * all (): IterableIterator<Failover> {
    for (const state of this.states.values()) if (this.upstreams.has(state.name)) yield state
  }
}
