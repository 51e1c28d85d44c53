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
 *   refuse before calling opossum at all.
 *
 * What counts as a failure is decided in one function, `isFailure`: connect errors, timeouts,
 * and statuses in `failureStatuses`. 4xx and client aborts never count.
 */
import { EventEmitter } from 'node:events'
import CircuitBreaker from 'opossum'
import type { Logger } from 'pino'
import type { CircuitBreakerConfig } from '../config/types.js'

export type CircuitState = 'closed' | 'half-open' | 'open'
export type ForcedState = 'open' | 'closed' | null

/** Prometheus encoding of the state (SPEC §9). */
export const STATE_VALUE: Record<CircuitState, number> = { closed: 0, 'half-open': 1, open: 2 }

/** The outcome a request reports to its breaker. */
export interface Outcome {
  /** Response status, or 0 when the request failed before one (connect error, timeout). */
  status: number
  /** The client went away first: neither a success nor a failure. */
  clientGone: boolean
}

/** One settling hook per request through a breaker. */
export interface Settle {
  resolve: () => void
  reject: (err: Error) => void
}

class UpstreamFailure extends Error {
  constructor (readonly status: number) {
    super(status === 0 ? 'upstream failed' : `upstream answered ${status}`)
  }
}

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

/** What a breaker runs: something that starts at once and reports its outcome through `settle`. */
export interface Guarded {
  start: (settle: Settle | null) => void
}

/** The action opossum runs: start the request, and wait for it to report its outcome. */
function awaitOutcome (this: unknown, guarded: Guarded): Promise<void> {
  return new Promise<void>((resolve, reject) => guarded.start({ resolve, reject }))
}

function ignore (): void {}

export class Circuit {
  readonly upstream: string
  readonly config: CircuitBreakerConfig
  /** Operator's forced state; null = automatic. */
  forced: ForcedState = null
  /** `Date.now()` when the circuit last opened on failures. */
  openedAt = 0
  private breaker: CircuitBreaker<[Guarded], void> | null
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

  private create (): CircuitBreaker<[Guarded], void> {
    const { config } = this
    const breaker = new CircuitBreaker<[Guarded], void>(awaitOutcome, {
      name: this.upstream,
      timeout: false,
      errorThresholdPercentage: config.failureThreshold * 100 - 1e-9,
      volumeThreshold: config.volumeThreshold,
      resetTimeout: config.recoveryTimeout,
      rollingCountTimeout: config.rollingWindowMs,
      rollingCountBuckets: BUCKETS,
      rollingPercentilesEnabled: false,
      enableSnapshots: false,
      rotateBucketController: this.clock.emitter(Math.max(10, Math.round(config.rollingWindowMs / BUCKETS)))
    })
    breaker.on('open', () => {
      this.openedAt = Date.now()
      this.events.onTransition(this.upstream, 'open')
    })
    breaker.on('halfOpen', () => this.events.onTransition(this.upstream, 'half-open'))
    breaker.on('close', () => {
      // A fresh breaker, so the failures that opened the circuit do not linger in the
      // window and re-open it on the first failure after recovery.
      const old = this.breaker
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
   * Run a request through the breaker: its `start` is called at once with the settle hook it
   * must report its outcome to exactly once (through `report`). Forced closed bypasses opossum.
   */
  fire (guarded: Guarded): void {
    const b = this.breaker
    if (this.forced === 'closed' || b === null) { guarded.start(null); return }
    b.fire(guarded).catch(ignore)
  }

  /** The single place that decides what is a failure. */
  isFailure (outcome: Outcome): boolean {
    if (outcome.clientGone) return false
    return outcome.status === 0 || this.failureStatuses[outcome.status] === 1
  }

  report (settle: Settle, outcome: Outcome): void {
    if (this.isFailure(outcome)) settle.reject(new UpstreamFailure(outcome.status))
    else settle.resolve()
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
