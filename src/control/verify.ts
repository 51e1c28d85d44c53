/**
 * Incidents and verification of restoration (SPEC §11). An incident opens when a trigger
 * fires (detection) or an operator mitigates; when a mitigation is applied, Breakwater checks
 * that service is really back before saying so:
 * - synthetic requests (`verification.synthetics`) sent through this sidecar's own proxy
 *   listener, each expecting its status, `successes` rounds in a row — a synthetic aimed at a
 *   route a mitigation now refuses (kill switch off, circuit forced open) is skipped, since it
 *   would measure the mitigation;
 * - and real traffic since the mitigation (the last `windowMs`) under the trigger's threshold
 *   (or `maxErrorRate` for an operator's incident).
 * It records detection, mitigation and restoration times, observes
 * `breakwater_time_to_restore_seconds`, and notifies "restoration verified" (PagerDuty resolve)
 * — or, after `timeoutMs`, that the mitigation did not restore service.
 */
import { randomBytes } from 'node:crypto'
import { request } from 'undici'
import type { Logger } from 'pino'
import type { Config, TriggerConfig } from '../config/types.js'
import type { RouteStats } from '../proxy/stats.js'
import { emptySums, quantile } from '../proxy/window.js'
import type { MitigationRecord } from '../state/state-file.js'
import type { Notifier } from './notify.js'

export interface Incident {
  id: string
  trigger: string | null
  scope: { route: string | null, upstream: string | null }
  version: string
  status: 'detected' | 'verifying' | 'restored' | 'not_restored'
  detectedAt: string
  mitigatedAt: string | null
  restoredAt: string | null
  /** `status`: a rollback's `running` → `succeeded` | `failed`; `active` for the others. */
  mitigation: { id: string, action: string, status: string, error?: string | null } | null
  timeToMitigateSeconds: number | null
  timeToRestoreSeconds: number | null
  checks: {
    syntheticRounds: number
    syntheticPassesInARow: number
    lastSynthetic: Array<{ path: string, status: number, expected: number }> | null
    errorRate: number | null
    p99Ms: number | null
    requests: number
  }
}

/** Upper bounds in seconds of the time-to-restore histogram. */
export const TTR_BUCKETS = [1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600] as const

export interface VerifierDeps {
  config: () => Config
  /** The proxy listener's URL (synthetics go through Breakwater itself). */
  proxy: () => string
  stats: () => Iterable<RouteStats>
  /** Whether a mitigation refuses a route now (its kill switch off, or its circuit forced open). */
  refusedByMitigation: (route: string) => boolean
  notifier: Notifier
  logger: Logger
}

interface Running {
  incident: Incident
  trigger: TriggerConfig | null
  timer: NodeJS.Timeout | null
  deadline: number
  busy: boolean
}

const KEEP = 50

export class Verifier {
  readonly incidents: Incident[] = []
  readonly ttrBuckets = new Float64Array(TTR_BUCKETS.length + 1)
  ttrSum = 0
  ttrCount = 0
  private readonly running = new Map<string, Running>()
  private stopped = false

  constructor (private readonly deps: VerifierDeps) {}

  /** A trigger fired: an incident is detected (one open incident per trigger). */
  triggerFired (trigger: TriggerConfig, at: number): Incident {
    const open = this.incidents.find((i) => i.trigger === trigger.name && (i.status === 'detected' || i.status === 'verifying'))
    if (open !== undefined) return open
    return this.open(trigger.name, { route: trigger.route, upstream: trigger.upstream }, at)
  }

  private open (trigger: string | null, scope: Incident['scope'], at: number): Incident {
    const incident: Incident = {
      id: `i-${at.toString(36)}-${randomBytes(2).toString('hex')}`,
      trigger,
      scope,
      version: this.deps.config().version,
      status: 'detected',
      detectedAt: new Date(at).toISOString(),
      mitigatedAt: null,
      restoredAt: null,
      mitigation: null,
      timeToMitigateSeconds: null,
      timeToRestoreSeconds: null,
      checks: { syntheticRounds: 0, syntheticPassesInARow: 0, lastSynthetic: null, errorRate: null, p99Ms: null, requests: 0 }
    }
    this.incidents.unshift(incident)
    if (this.incidents.length > KEEP) this.incidents.length = KEEP
    this.deps.logger.warn({ event: 'incident', incident: incident.id, phase: 'detected', trigger }, 'incident detected')
    return incident
  }

  /** The open incident a mitigation belongs to (its trigger's, or the one it already joined), opened if none. */
  private incidentOf (record: MitigationRecord, at: number): { incident: Incident, trigger: TriggerConfig | null } {
    const triggerName = record.source.startsWith('trigger:') ? record.source.slice(8) : null
    const trigger = triggerName === null ? null : this.deps.config().rollbackTriggers.find((t) => t.name === triggerName) ?? null
    let incident = this.incidents.find((i) => i.mitigation?.id === record.id)
    if (incident === undefined && triggerName !== null) incident = this.incidents.find((i) => i.trigger === triggerName && (i.status === 'detected' || i.status === 'verifying'))
    incident ??= this.open(triggerName, { route: trigger?.route ?? null, upstream: trigger?.upstream ?? null }, at)
    return { incident, trigger }
  }

  /** A rollback started (it runs in the background): the incident shows it, not yet verified. */
  mitigationStarted (record: MitigationRecord, at = Date.now()): Incident {
    const { incident } = this.incidentOf(record, at)
    incident.mitigation = { id: record.id, action: record.action, status: record.status }
    return incident
  }

  /** A rollback's action failed: the incident stays open, and says so. */
  mitigationFailed (record: MitigationRecord, at = Date.now()): Incident {
    const { incident } = this.incidentOf(record, at)
    incident.mitigation = { id: record.id, action: record.action, status: record.status, error: record.error ?? null }
    this.deps.logger.error({ event: 'incident', incident: incident.id, phase: 'mitigation_failed', mitigation: record.id, action: record.action, error: record.error }, 'the mitigation failed; the incident stays open')
    return incident
  }

  /** A mitigation was applied: verify that it restored service. */
  mitigated (record: MitigationRecord, at = Date.now()): Incident {
    const { incident, trigger } = this.incidentOf(record, at)
    const previous = this.running.get(incident.id)
    if (previous?.timer != null) clearTimeout(previous.timer)
    incident.status = 'verifying'
    incident.mitigatedAt = new Date(at).toISOString()
    incident.mitigation = { id: record.id, action: record.action, status: record.status }
    incident.timeToMitigateSeconds = round((at - Date.parse(incident.detectedAt)) / 1000)
    incident.checks.syntheticPassesInARow = 0
    this.deps.logger.warn({ event: 'incident', incident: incident.id, phase: 'mitigated', mitigation: record.id, action: record.action, timeToMitigateSeconds: incident.timeToMitigateSeconds }, 'incident mitigated; verifying restoration')
    const run: Running = { incident, trigger, timer: null, deadline: at + this.deps.config().verification.timeoutMs, busy: false }
    this.running.set(incident.id, run)
    this.schedule(run, Math.min(250, this.deps.config().verification.intervalMs))
    return incident
  }

  private schedule (run: Running, ms: number): void {
    if (this.stopped) return
    run.timer = setTimeout(() => { void this.check(run) }, ms)
    run.timer.unref()
  }

  private async check (run: Running): Promise<void> {
    const { incident } = run
    const cfg = this.deps.config()
    const v = cfg.verification
    const synthetics = v.synthetics.filter((s) => (s.route === null || !this.deps.refusedByMitigation(s.route)) &&
      (incident.scope.route === null || s.route === null || s.route === incident.scope.route))
    let syntheticsOk = true
    if (synthetics.length > 0) {
      const results = await Promise.all(synthetics.map(async (s) => {
        let status = 0
        try {
          const res = await request(`${this.deps.proxy()}${s.path}`, {
            method: s.method as 'GET',
            headers: { 'x-breakwater-synthetic': incident.id, 'user-agent': 'breakwater-verify', ...(s.host !== null ? { host: s.host } : {}) },
            headersTimeout: 5000,
            bodyTimeout: 5000
          })
          await res.body.dump()
          status = res.statusCode
        } catch { /* status 0: failed */ }
        return { path: s.path, status, expected: s.expectStatus }
      }))
      incident.checks.syntheticRounds++
      incident.checks.lastSynthetic = results
      syntheticsOk = results.every((r) => r.status === r.expected)
      incident.checks.syntheticPassesInARow = syntheticsOk ? incident.checks.syntheticPassesInARow + 1 : 0
    }
    if (this.stopped || incident.status !== 'verifying') return
    const traffic = this.readTraffic(run, Date.now())
    incident.checks.errorRate = traffic.errorRate
    incident.checks.p99Ms = traffic.p99Ms
    incident.checks.requests = traffic.requests
    const syntheticsPassed = synthetics.length === 0 ? null : incident.checks.syntheticPassesInARow >= v.successes
    // Restored: every signal we have says so. Real traffic must agree when there is any; only
    // after a whole verification window without enough of it do synthetics speak alone.
    const quietWindow = Date.now() - Date.parse(incident.mitigatedAt as string) >= v.windowMs
    const limit = run.trigger !== null && run.trigger.metric === 'error_rate' ? run.trigger.threshold : v.maxErrorRate
    const fewAndFine = traffic.ok === null && (traffic.errorRate ?? 0) <= limit
    const restored = syntheticsPassed !== false && (traffic.ok === true || (fewAndFine && syntheticsPassed === true && quietWindow))
    if (restored) { this.restored(run); return }
    if (Date.now() >= run.deadline) { this.notRestored(run); return }
    this.schedule(run, v.intervalMs)
  }

  /** Real traffic since the mitigation: ok (true), not ok (false), or too little to say (null). */
  private readTraffic (run: Running, now: number): { ok: boolean | null, errorRate: number | null, p99Ms: number | null, requests: number } {
    const cfg = this.deps.config()
    const since = Math.max(Date.parse(run.incident.mitigatedAt as string), now - cfg.verification.windowMs)
    // Whole seconds after the mitigation only: the second it happened in still holds the failures.
    const from = Math.floor(since / 1000) + 1
    const to = Math.floor(now / 1000) + 1
    const sums = emptySums(true)
    const scope = run.incident.scope
    for (const s of this.deps.stats()) {
      if (s.route === '') continue
      if (scope.route !== null && s.route !== scope.route) continue
      if (scope.upstream !== null && s.upstream !== scope.upstream) continue
      s.window.sum(from, to, sums)
    }
    const errorRate = sums.requests === 0 ? null : sums.errors / sums.requests
    const p99Ms = quantile(sums.latency as Float64Array, 0.99)
    const minRequests = Math.min(run.trigger?.minRequests ?? 10, 10)
    if (sums.requests < minRequests) return { ok: null, errorRate, p99Ms, requests: sums.requests }
    const t = run.trigger
    const ok = t !== null && t.metric === 'p99_latency'
      ? (p99Ms ?? 0) <= t.threshold
      : (errorRate ?? 0) <= (t !== null ? t.threshold : cfg.verification.maxErrorRate)
    return { ok, errorRate, p99Ms, requests: sums.requests }
  }

  private restored (run: Running): void {
    const { incident } = run
    const now = Date.now()
    this.running.delete(incident.id)
    incident.status = 'restored'
    incident.restoredAt = new Date(now).toISOString()
    const ttr = (now - Date.parse(incident.detectedAt)) / 1000
    incident.timeToRestoreSeconds = round(ttr)
    let i = 0
    while (i < TTR_BUCKETS.length && ttr > (TTR_BUCKETS[i] as number)) i++
    this.ttrBuckets[i]++
    this.ttrSum += ttr
    this.ttrCount++
    this.deps.logger.warn({ event: 'incident', incident: incident.id, phase: 'restored', timeToRestoreSeconds: incident.timeToRestoreSeconds, checks: incident.checks }, 'restoration verified')
    this.notify(incident, 'restoration_verified', `service restored (verified) ${incident.timeToRestoreSeconds} s after detection, by ${incident.mitigation?.action ?? 'mitigation'} ${incident.mitigation?.id ?? ''}`)
  }

  private notRestored (run: Running): void {
    const { incident } = run
    this.running.delete(incident.id)
    incident.status = 'not_restored'
    this.deps.logger.error({ event: 'incident', incident: incident.id, phase: 'not_restored', checks: incident.checks }, 'the mitigation did not restore service')
    this.notify(incident, 'restoration_failed', `NOT restored: ${incident.mitigation?.action ?? 'the mitigation'} ${incident.mitigation?.id ?? ''} did not bring service back within ${this.deps.config().verification.timeoutMs / 1000} s`)
  }

  private notify (incident: Incident, kind: 'restoration_verified' | 'restoration_failed', summary: string): void {
    const cfg = this.deps.config()
    this.deps.notifier.notify({
      kind,
      service: cfg.service,
      version: incident.version,
      trigger: incident.trigger,
      summary,
      details: {
        incident: incident.id,
        detectedAt: incident.detectedAt,
        mitigatedAt: incident.mitigatedAt,
        restoredAt: incident.restoredAt,
        timeToMitigateSeconds: incident.timeToMitigateSeconds,
        timeToRestoreSeconds: incident.timeToRestoreSeconds,
        errorRate: incident.checks.errorRate,
        syntheticRounds: incident.checks.syntheticRounds
      },
      time: new Date().toISOString()
    })
  }

  stop (): void {
    this.stopped = true
    for (const r of this.running.values()) if (r.timer !== null) clearTimeout(r.timer)
    this.running.clear()
  }
}

function round (x: number): number {
  return Math.round(x * 1000) / 1000
}
