/**
 * Rollback triggers (SPEC §7, §14) on the sidecar's own traffic, evaluated every second over
 * sliding windows (proxy/window.ts) read through running sums: an evaluation costs the same
 * whatever the window's length (SPEC §15).
 *
 * - `error_rate`: upstream 5xx, Breakwater's 502/504 and refusals by a circuit that failures
 *   opened, over all recorded requests; refusals by kill switches, forced circuits and
 *   bulkheads are never recorded, so a mitigation cannot keep its own trigger firing.
 * - `p99_latency`: milliseconds to response headers.
 *
 * A trigger with fewer than `minRequests` in its window is *inconclusive*, never firing. Above
 * its threshold for `for`, it fires once and runs its action; it re-arms only after the metric
 * stayed below the threshold for a full window, or after a full window with too little data to
 * judge (it is inconclusive again then, and its incident is left as it is).
 *
 * Every interval here (`for`, the window, re-arming) runs on the windows' monotonic clock
 * (`windowNowMs`): a step of the wall clock neither blinds a trigger nor cuts its `for` short.
 * Only `firedAt`, which people read, is a wall-clock time.
 */
import type { Logger } from 'pino'
import type { TriggerConfig } from '../config/types.js'
import type { RouteStats } from '../proxy/stats.js'
import { emptySums, quantile, samples, windowNowMs, RunningSum, type WindowSums } from '../proxy/window.js'

export type TriggerState = 'inconclusive' | 'ok' | 'pending' | 'fired' | 'rearming'

export interface TriggerStatus {
  name: string
  metric: TriggerConfig['metric']
  threshold: number
  window: string
  action: TriggerConfig['action']
  minRequests: number
  scope: { route: string | null, upstream: string | null }
  state: TriggerState
  /** Current value: a ratio for error_rate, ms for p99_latency; null without data. */
  value: number | null
  requests: number
  errors: number
  fired: number
  firedAt: string | null
  lastOutcome: string | null
}

/** What a trigger does when it fires; resolves to a short outcome for the state view and logs. */
/**
 * What a fired trigger does. `incident`: the incident it belongs to, and whether this firing
 * opened it (false: it fired again into one still open, as after a restart); null when not
 * known (a fleet takeover), announced as a new one.
 */
export type TriggerAction = (trigger: TriggerConfig, reading: Reading, incident: { id: string, opened: boolean } | null) => Promise<string>

export interface Reading {
  value: number
  requests: number
  errors: number
}

interface Live {
  config: TriggerConfig
  window: RunningSum
  sums: WindowSums
  state: TriggerState
  value: number | null
  requests: number
  errors: number
  pendingSince: number | null
  belowSince: number | null
  /** Since when a fired trigger has had too little data to judge (it re-arms after a window of it). */
  quietSince: number | null
  fired: number
  /** When it last fired, on the window clock (intervals), and as the wall clock read then (people). */
  firedAt: number | null
  firedAtIso: string | null
  lastOutcome: string | null
}

export class TriggerEngine {
  private live: Live[] = []
  private timer: NodeJS.Timeout | null = null
  readonly firedTotal = new Map<string, number>()
  /** Told first when a trigger fires, `at` on the wall clock (incidents open here). */
  onFire: (trigger: TriggerConfig, reading: Reading, at: number) => { id: string, opened: boolean } | null = () => null
  /** Told when a fired trigger re-arms (its metric stayed under the threshold for a window). */
  onRearm: (trigger: TriggerConfig) => void = () => {}

  constructor (
    private readonly stats: () => Iterable<RouteStats>,
    private readonly act: TriggerAction,
    private readonly logger: Logger
  ) {}

  /** (Re)configure; a trigger keeps its state across reloads when its definition is unchanged. */
  configure (triggers: readonly TriggerConfig[]): void {
    const prev = new Map(this.live.map((l) => [l.config.name, l]))
    this.live = triggers.map((config) => {
      const old = prev.get(config.name)
      if (old !== undefined && JSON.stringify(old.config) === JSON.stringify(config)) return old
      const withLatency = config.metric === 'p99_latency'
      return { config, window: new RunningSum(config.windowMs, withLatency), sums: emptySums(withLatency), state: 'inconclusive', value: null, requests: 0, errors: 0, pendingSince: null, belowSince: null, quietSince: null, fired: old?.fired ?? 0, firedAt: null, firedAtIso: null, lastOutcome: null }
    })
    for (const t of triggers) if (!this.firedTotal.has(t.name)) this.firedTotal.set(t.name, 0)
  }

  start (): void {
    if (this.timer !== null) return
    this.timer = setInterval(() => { this.evaluate() }, 1000)
    this.timer.unref()
  }

  stop (): void {
    if (this.timer !== null) clearInterval(this.timer)
    this.timer = null
  }

  /** One evaluation of every trigger at `nowMs` (the window clock, window.ts). */
  evaluate (nowMs = windowNowMs()): void {
    for (const t of this.live) this.step(t, nowMs)
  }

  private read (t: Live, nowMs: number): Reading & { hasData: boolean } {
    const c = t.config
    const scope = []
    for (const s of this.stats()) {
      if (c.route !== null && s.route !== c.route) continue
      if (c.upstream !== null && s.upstream !== c.upstream) continue
      scope.push(s.window)
    }
    const sums = t.window.read(scope, nowMs, t.sums)
    let value: number | null
    let volume = sums.requests
    if (c.metric === 'error_rate') value = sums.requests === 0 ? null : sums.errors / sums.requests
    else {
      value = quantile(sums.latency as Float64Array, 0.99)
      // A p99 is judged on answers with a latency: a refusal by a circuit failures opened is a
      // request of the window (and an error) but has none, and must not make two answers a p99.
      volume = samples(sums.latency as Float64Array)
    }
    return { value: value ?? 0, requests: volume, errors: sums.errors, hasData: value !== null }
  }

  private step (t: Live, now: number): void {
    const c = t.config
    const r = this.read(t, now)
    t.value = r.hasData ? r.value : null
    t.requests = r.requests
    t.errors = r.errors
    const conclusive = r.requests >= c.minRequests && r.hasData
    const breach = conclusive && r.value > c.threshold

    if (t.state === 'fired' || t.state === 'rearming') {
      if (breach) { t.belowSince = null; t.quietSince = null; t.state = 'fired'; return }
      if (!conclusive) {
        // Too little data either way: stay as we are — for up to a whole window. After that the
        // window holds nothing of what fired the trigger (a kill switch or a forced circuit that
        // refuses its whole scope records nothing, nor does a night without traffic): it is
        // inconclusive again, so a failure that comes back (the mitigation lifted, the fault still
        // there) fires it again instead of finding it still "fired" and saying nothing. Its
        // incident is left as it is: no data says service is back.
        t.quietSince ??= now
        if (now - t.quietSince >= c.windowMs) {
          t.state = 'inconclusive'
          t.belowSince = null
          t.pendingSince = null
          t.quietSince = null
          this.logger.info({ event: 'trigger_rearmed', trigger: c.name, inconclusive: true, requests: r.requests }, 'trigger re-armed: too little traffic to judge for a whole window')
        }
        return
      }
      t.quietSince = null
      t.belowSince ??= now
      t.state = 'rearming'
      if (now - t.belowSince >= c.windowMs) {
        t.state = 'ok'
        t.belowSince = null
        t.pendingSince = null
        this.logger.info({ event: 'trigger_rearmed', trigger: c.name, value: t.value }, 'trigger re-armed')
        this.onRearm(c)
      }
      return
    }
    if (!conclusive) { t.state = 'inconclusive'; t.pendingSince = null; return }
    if (!breach) { t.state = 'ok'; t.pendingSince = null; return }
    t.pendingSince ??= now
    if (now - t.pendingSince < c.forMs) { t.state = 'pending'; return }
    this.fire(t, r, now)
  }

  private fire (t: Live, r: Reading, now: number): void {
    const c = t.config
    t.state = 'fired'
    t.fired++
    t.firedAt = now
    const at = Date.now()
    t.firedAtIso = new Date(at).toISOString()
    t.belowSince = null
    t.quietSince = null
    this.firedTotal.set(c.name, (this.firedTotal.get(c.name) ?? 0) + 1)
    this.logger.warn({ event: 'trigger_fired', trigger: c.name, metric: c.metric, value: r.value, threshold: c.threshold, window: c.windowMs, requests: r.requests, errors: r.errors, action: c.action }, `trigger ${c.name} fired`)
    const incident = this.onFire(c, r, at)
    t.lastOutcome = 'running'
    this.act(c, r, incident).then((outcome) => { t.lastOutcome = outcome }, (err: unknown) => {
      t.lastOutcome = `failed: ${(err as Error).message}`
      this.logger.error({ event: 'trigger_action_failed', trigger: c.name, action: c.action, error: (err as Error).message }, 'trigger action failed')
    })
  }

  status (): TriggerStatus[] {
    return this.live.map((t) => ({
      name: t.config.name,
      metric: t.config.metric,
      threshold: t.config.threshold,
      window: `${t.config.windowMs / 1000}s`,
      action: t.config.action,
      minRequests: t.config.minRequests,
      scope: { route: t.config.route, upstream: t.config.upstream },
      state: t.state,
      value: t.value === null ? null : Math.round(t.value * 1e4) / 1e4,
      requests: t.requests,
      errors: t.errors,
      fired: t.fired,
      firedAt: t.firedAtIso,
      lastOutcome: t.lastOutcome
    }))
  }

  /** Current values for metrics: name → value (NaN without data). */
  values (): Array<[string, number]> {
    return this.live.map((t) => [t.config.name, t.value ?? Number.NaN])
  }
}

/** `error_rate 0.12 > 0.05 over 300s (340 requests)` */
export function describeReading (c: TriggerConfig, r: Reading): string {
  const value = c.metric === 'error_rate' ? r.value.toFixed(3) : `${Math.round(r.value)} ms`
  const threshold = c.metric === 'error_rate' ? String(c.threshold) : `${c.threshold} ms`
  return `${c.metric} ${value} > ${threshold} over ${c.windowMs / 1000}s (${r.requests} requests)`
}

