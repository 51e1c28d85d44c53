/**
 * Stage: circuit breaker and bulkhead, one per upstream listed in `circuitBreakers`, local to
 * this instance (SPEC §4, §14). opossum keeps the state machine; this file neutralises its
 * traps for a proxy:
 *
 * - `volumeThreshold` defaults to 0 in opossum (one failure opens): always passed (default 20);
 * - its threshold test is a strict `>`, ours "reaches": the percentage is nudged down by 1e-9;
 * - `capacity` (semaphore) rejections count as failures and open the circuit: the bulkhead is
 *   our own counter, checked *before* the breaker, and never reaches opossum;
 * - `rollingPercentilesEnabled` sorts every latency of the window on each failure: off
 *   (latency is in the metrics histogram);
 * - its per-call timeout timer shares one AbortController for all calls: `timeout: false`,
 *   undici owns timeouts per request;
 * - its rolling window survives a close, so one failure after a good probe re-opens: on close,
 *   the breaker is replaced by a fresh one (fresh window);
 * - a rejected `fire()` while open still counts as a `fire` and dilutes the ratio: while open we
 *   refuse before calling opossum at all;
 * - every `fire()` counts in the window the moment it is called, and a call can only end in
 *   `success` (which also closes a half-open circuit) or `failure` (which re-opens it): a client
 *   that leaves would have to count as one or the other. So a request through a closed circuit
 *   is fired only when its cause is known, with that verdict (an abort is never fired: it
 *   neither counts as a success nor dilutes the ratio), and only into the breaker generation it
 *   started under and only while that is still closed (a result from before a trip is not a
 *   probe result, opossum #381);
 * - a half-open probe takes opossum's single slot (`pendingClose`) when it starts, and opossum
 *   has no call that gives the slot back: a probe that ends with neither cause (its client
 *   left) swaps in a breaker built half-open through opossum's `state` option, so the next
 *   request is the new probe and the circuit neither closes nor waits out another
 *   `recoveryTimeout`.
 *
 * What a request's cause is (`ok`, `upstream`, `client`, `breakwater`) is decided once, in
 * context.ts (SPEC §15); this file only reads it: `upstream` is a failure, `ok` a success,
 * anything else neither. `failureStatuses` is kept here as a lookup table for that decision.
 */
import { EventEmitter } from 'node:events'
import CircuitBreaker from 'opossum'
import type { Logger } from 'pino'
import type { CircuitBreakerConfig } from '../config/types.js'

export type CircuitState = 'closed' | 'half-open' | 'open'
export type ForcedState = 'open' | 'closed' | null

/** Prometheus encoding of the state (SPEC §9). */
export const STATE_VALUE: Record<CircuitState, number> = { closed: 0, 'half-open': 1, open: 2 }

/** A request's cause, as the outcome model decides it (context.ts). */
type Cause = 'ok' | 'upstream' | 'client' | 'breakwater'

class UpstreamFailure extends Error {
  constructor () {
    super('upstream failed')
  }
}

const FAILURE = new UpstreamFailure()

/** Shared bucket rotation: one timer per window size for all breakers (opossum PR #809). */
export class RotationClock {
  private readonly emitters = new Map<number, { emitter: EventEmitter, timer: NodeJS.Timeout }>()

  emitter (bucketMs: number): EventEmitter {
    let entry = this.emitters.get(bucketMs)
    if (entry === undefined) {
      const emitter = new EventEmitter()
      emitter.setMaxListeners(0)
      const timer = setInterval(() => emitter.emit('rotate'), bucketMs)
      timer.unref()
      entry = { emitter, timer }
      this.emitters.set(bucketMs, entry)
    }
    return entry.emitter
  }

  stop (): void {
    for (const { timer } of this.emitters.values()) clearInterval(timer)
    this.emitters.clear()
  }
}

export interface CircuitEvents {
  onTransition (upstream: string, to: CircuitState): void
}

const BUCKETS = 10

type Breaker = CircuitBreaker<[boolean | Probe], void>

/** A half-open probe in flight: opossum's pending call, settled when the probe's cause is known. */
class Probe {
  resolve: () => void = ignore
  reject: (err: Error) => void = ignore
  constructor (readonly breaker: Breaker) {}
}

/**
 * What a request holds while it is through the breaker: the breaker generation it started
 * under (closed), or its probe (half-open). Opaque outside this file.
 */
export type Pass = Breaker | Probe

/**
 * The action opossum runs: a verdict already reached (`true`: the upstream failed), or, for a
 * half-open probe, a promise settled when the probe ends.
 */
function verdict (this: unknown, arg: boolean | Probe): Promise<void> {
  if (arg === false) return Promise.resolve()
  if (arg === true) return Promise.reject(FAILURE)
  return new Promise<void>((resolve, reject) => {
    arg.resolve = resolve
    arg.reject = reject
  })
}

function ignore (): void {}

export class Circuit {
  readonly upstream: string
  readonly config: CircuitBreakerConfig
  /** Operator's forced state; null = automatic. */
  forced: ForcedState = null
  /** `Date.now()` when the circuit last opened on failures. */
  openedAt = 0
  private breaker: Breaker | null
  /** The generation whose close started the current one (a probe's late failure belongs to it alone). */
  private closedLast: Breaker | null = null
  private readonly clock: RotationClock
  private readonly events: CircuitEvents
  private readonly failureStatuses: Uint8Array

  /** `automatic: false` makes a manual circuit: only forced states, no breaker behind it. */
  constructor (upstream: string, config: CircuitBreakerConfig, clock: RotationClock, events: CircuitEvents, automatic = true) {
    this.upstream = upstream
    this.config = config
    this.clock = clock
    this.events = events
    this.failureStatuses = new Uint8Array(600)
    for (const s of config.failureStatuses) this.failureStatuses[s] = 1
    this.breaker = automatic ? this.create() : null
  }

  /** False for a manual circuit (an upstream without `circuitBreakers` that was forced). */
  get automatic (): boolean {
    return this.breaker !== null
  }

  /** A breaker with a fresh window; `halfOpen` builds it half-open with the probe slot free. */
  private create (halfOpen = false): Breaker {
    const { config } = this
    const breaker: Breaker = new CircuitBreaker(verdict, {
      name: this.upstream,
      timeout: false,
      errorThresholdPercentage: config.failureThreshold * 100 - 1e-9,
      volumeThreshold: config.volumeThreshold,
      resetTimeout: config.recoveryTimeout,
      rollingCountTimeout: config.rollingWindowMs,
      rollingCountBuckets: BUCKETS,
      rollingPercentilesEnabled: false,
      enableSnapshots: false,
      rotateBucketController: this.clock.emitter(Math.max(10, Math.round(config.rollingWindowMs / BUCKETS))),
      // opossum's documented way to build a breaker in a given state (it emits nothing for it).
      state: halfOpen ? { closed: false, halfOpen: true } : undefined
    } as CircuitBreaker.Options)
    breaker.on('open', () => {
      this.openedAt = Date.now()
      this.events.onTransition(this.upstream, 'open')
    })
    breaker.on('halfOpen', () => this.events.onTransition(this.upstream, 'half-open'))
    breaker.on('close', () => {
      // A fresh breaker, so the failures that opened the circuit do not linger in the
      // window and re-open it on the first failure after recovery.
      const old = this.breaker
      this.closedLast = old
      this.breaker = this.create()
      old?.shutdown()
      this.events.onTransition(this.upstream, 'closed')
    })
    return breaker
  }

  /** The state operators and metrics see (a forced state wins). */
  get state (): CircuitState {
    if (this.forced === 'open') return 'open'
    if (this.forced === 'closed') return 'closed'
    const b = this.breaker
    if (b === null) return 'closed'
    if (b.opened) return 'open'
    if (b.halfOpen) return 'half-open'
    return 'closed'
  }

  /** The automatic state, ignoring a forced one. */
  get automaticState (): CircuitState {
    const b = this.breaker
    if (b === null) return 'closed'
    return b.opened ? 'open' : b.halfOpen ? 'half-open' : 'closed'
  }

  /**
   * Whether a request may go to the upstream now. False while open, or half-open with the
   * probe already in flight (opossum lets exactly one through).
   */
  admits (): boolean {
    if (this.forced !== null) return this.forced === 'closed'
    const b = this.breaker
    return b === null || b.closed || b.pendingClose
  }

  /** True when `admits()` is false because failures opened it (not an operator). */
  get openOnFailures (): boolean {
    return this.forced === null && !this.admits()
  }

  /** Seconds until the circuit will try a probe (for `retry-after`). */
  retryAfterSeconds (now: number): number {
    if (this.forced === 'open' || this.openedAt === 0) return Math.max(1, Math.ceil(this.config.recoveryTimeout / 1000))
    return Math.max(1, Math.ceil((this.openedAt + this.config.recoveryTimeout - now) / 1000))
  }

  /**
   * Whether the request that entered with `pass` may send the upstream another attempt (a
   * retry): not once the circuit has opened, on failures or by an operator, since an open
   * circuit means the upstream sees nothing more. A half-open probe may retry within itself
   * while its circuit is still half-open.
   */
  readmits (pass: Pass | null): boolean {
    if (this.forced !== null) return this.forced === 'closed'
    const b = this.breaker
    if (b === null || b.closed) return true
    return pass instanceof Probe && pass.breaker === b && b.halfOpen
  }

  /**
   * A request admitted by `admits()` enters: through a closed circuit it only notes the breaker
   * generation (nothing is counted yet); half-open, it takes the probe slot. Null when nothing
   * will be counted (forced closed, or a manual circuit).
   */
  enter (): Pass | null {
    const b = this.breaker
    if (this.forced === 'closed' || b === null) return null
    if (b.closed) return b
    const probe = new Probe(b)
    b.fire(probe).catch(ignore)
    return probe
  }

  /** The request that entered with `pass` ended with `cause`: count it, once. */
  settle (pass: Pass, cause: Cause): void {
    if (pass instanceof Probe) {
      if (cause === 'ok') pass.resolve()
      else if (cause === 'upstream') pass.reject(FAILURE)
      else this.releaseProbe(pass)
      return
    }
    // Through a closed circuit: counted now, with its verdict, if that generation is still closed.
    if (pass !== this.breaker || !pass.closed || (cause !== 'ok' && cause !== 'upstream')) return
    pass.fire(cause === 'upstream').catch(ignore)
  }

  /**
   * A response head that looks good: a half-open probe is settled on it (the circuit closes
   * without waiting for a long body); true if `pass` was one. A closed circuit's count waits for
   * the response's end (`settle`).
   */
  settleHead (pass: Pass): boolean {
    if (!(pass instanceof Probe)) return false
    this.settle(pass, 'ok')
    return true
  }

  /**
   * A probe settled on its good head (`settleHead`) lost its body afterwards: one failure in the
   * window its success opened, while that window is still the current one and closed. Once the
   * circuit has opened again (and perhaps closed on another probe), it is dropped: an old result
   * must not re-open a circuit a newer probe closed, nor count against a fresh window (opossum #381).
   */
  lateFailure (probe: Pass): void {
    const b = this.breaker
    if (this.forced !== null || b === null || !b.closed || !(probe instanceof Probe) || probe.breaker !== this.closedLast) return
    b.fire(true).catch(ignore)
  }

  /** A probe that ended with neither cause: the circuit stays half-open and the next request probes. */
  private releaseProbe (probe: Probe): void {
    const old = probe.breaker
    if (old === this.breaker && old.halfOpen) {
      this.breaker = this.create(true)
      old.shutdown()
    }
    // On a shut-down breaker this settles opossum's call with no listener left to count it.
    probe.resolve()
  }

  /** Whether `status` is in `failureStatuses` (for the outcome model's decision). */
  isFailureStatus (status: number): boolean {
    return this.failureStatuses[status] === 1
  }

  /** Failure ratio in the current window (0 when empty). */
  get failureRate (): number {
    if (this.breaker === null) return 0
    const s = this.breaker.stats
    return s.fires === 0 ? 0 : s.failures / s.fires
  }

  get windowRequests (): number {
    return this.breaker === null ? 0 : this.breaker.stats.fires
  }

  shutdown (): void {
    this.breaker?.shutdown()
  }
}
