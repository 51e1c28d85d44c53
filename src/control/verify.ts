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
 * Real traffic means real (SPEC §15): the verifier's own probes are subtracted from the
 * windows, by what it sent — never by a header a client could forge — and synthetics never
 * restore an incident on their own. Without real traffic the incident ends `unverified`.
 * Both are scoped to the incident: the routes of its trigger's scope that the mitigation does
 * not refuse, or else the rest of the service (routesToJudge).
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
  /** `unverified`: no real traffic to judge by before `timeoutMs` (synthetics alone never restore). */
  status: 'detected' | 'verifying' | 'restored' | 'not_restored' | 'unverified'
  detectedAt: string
  mitigatedAt: string | null
  restoredAt: string | null
  /** `status`: a rollback's `running` → `succeeded` | `failed`; `active` for the others. */
  mitigation: { id: string, action: string, status: string, error?: string | null } | null
  timeToMitigateSeconds: number | null
  timeToRestoreSeconds: number | null
  /** In a fleet (SPEC §16): whether this sidecar acts for the incident, and who does. */
  fleet?: { role: 'leader' | 'follower', leader: string }
  checks: {
    syntheticRounds: number
    syntheticPassesInARow: number
    lastSynthetic: Array<{ path: string, status: number, expected: number }> | null
    errorRate: number | null
    p99Ms: number | null
    /** Real requests since the mitigation, in scope (the verifier's probes excluded). */
    requests: number
    /** The verifier's own probes the windows counted, subtracted from the figures above. */
    syntheticRequests: number
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
  /** The route and upstream a request would take (where a probe is counted), or null. */
  routeOf: (method: string, path: string, host: string | null) => { route: string } | null
  notifier: Notifier
  logger: Logger
}

/** One probe the data plane counted: subtracted from the real-traffic figure. */
interface Probe {
  second: number
  route: string
  error: boolean
}

interface Running {
  incident: Incident
  trigger: TriggerConfig | null
  timer: NodeJS.Timeout | null
  deadline: number
  busy: boolean
  probes: Probe[]
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
      checks: { syntheticRounds: 0, syntheticPassesInARow: 0, lastSynthetic: null, errorRate: null, p99Ms: null, requests: 0, syntheticRequests: 0 }
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
    const run: Running = { incident, trigger, timer: null, deadline: at + this.deps.config().verification.timeoutMs, busy: false, probes: previous?.probes ?? [] }
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
    const routes = this.routesToJudge(incident)
    const synthetics = v.synthetics.filter((s) => {
      const route = s.route ?? this.deps.routeOf(s.method, s.path, s.host)?.route ?? null
      // A probe no route takes still runs: its 404 is evidence.
      return route === null || routes.has(route)
    })
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
        // Answered by the proxy, so counted in its windows: remember it, to subtract it.
        const where = status === 0 ? null : this.deps.routeOf(s.method, s.path, s.host)
        if (where !== null) run.probes.push({ second: Math.floor(Date.now() / 1000), ...where, error: status >= 500 })
        return { path: s.path, status, expected: s.expectStatus }
      }))
      incident.checks.syntheticRounds++
      incident.checks.lastSynthetic = results
      syntheticsOk = results.every((r) => r.status === r.expected)
      incident.checks.syntheticPassesInARow = syntheticsOk ? incident.checks.syntheticPassesInARow + 1 : 0
    }
    if (this.stopped || incident.status !== 'verifying') return
    const traffic = this.readTraffic(run, routes, Date.now())
    incident.checks.errorRate = traffic.errorRate
    incident.checks.p99Ms = traffic.p99Ms
    incident.checks.requests = traffic.requests
    incident.checks.syntheticRequests = traffic.synthetic
    const syntheticsPassed = synthetics.length === 0 ? null : incident.checks.syntheticPassesInARow >= v.successes
    // Restored: every signal we have says so, and real traffic is among them — probes alone
    // only say that the probed paths answer, not that users are served.
    const restored = syntheticsPassed !== false && traffic.ok === true
    if (restored) { this.restored(run); return }
    // Out of time: failing checks say "not restored"; no real traffic and no failing check say nothing.
    if (Date.now() >= run.deadline) { this.notRestored(run, traffic.ok === null && syntheticsOk); return }
    this.schedule(run, v.intervalMs)
  }

  /**
   * The routes whose traffic and synthetics judge an incident: those of its scope (its
   * trigger's route and upstream) that no mitigation refuses now — a refused route would only
   * measure the mitigation. When the mitigation refuses the whole scope (a kill switch of the
   * failing route, a circuit forced open on the failing upstream), what is left to judge is
   * the rest of the service, every route it does not refuse.
   */
  private routesToJudge (incident: Incident): Set<string> {
    const { scope } = incident
    const serving = this.deps.config().routes.filter((r) => !this.deps.refusedByMitigation(r.name))
    const inScope = serving.filter((r) => (scope.route === null || r.name === scope.route) && (scope.upstream === null || r.upstream === scope.upstream))
    return new Set((inScope.length > 0 ? inScope : serving).map((r) => r.name))
  }

  /** Real traffic since the mitigation: ok (true), not ok (false), or too little to say (null). */
  private readTraffic (run: Running, routes: ReadonlySet<string>, now: number): { ok: boolean | null, errorRate: number | null, p99Ms: number | null, requests: number, synthetic: number } {
    const cfg = this.deps.config()
    const since = Math.max(Date.parse(run.incident.mitigatedAt as string), now - cfg.verification.windowMs)
    // Whole seconds after the mitigation only: the second it happened in still holds the failures.
    const from = Math.floor(since / 1000) + 1
    const to = Math.floor(now / 1000) + 1
    const sums = emptySums(true)
    for (const s of this.deps.stats()) {
      if (routes.has(s.route)) s.window.sum(from, to, sums)
    }
    // The verifier's own probes are not real traffic. (Their latencies stay in the histogram:
    // a probe is one request among the window's, and bins cannot be told apart.)
    let synthetic = 0
    for (const p of run.probes) {
      if (p.second < from || p.second >= to || !routes.has(p.route)) continue
      synthetic++
      sums.requests--
      if (p.error) sums.errors--
    }
    run.probes = run.probes.filter((p) => p.second >= from)
    sums.requests = Math.max(0, sums.requests)
    sums.errors = Math.min(Math.max(0, sums.errors), sums.requests)
    const errorRate = sums.requests === 0 ? null : sums.errors / sums.requests
    const p99Ms = quantile(sums.latency as Float64Array, 0.99)
    const minRequests = Math.min(run.trigger?.minRequests ?? 10, 10)
    if (sums.requests < minRequests) return { ok: null, errorRate, p99Ms, requests: sums.requests, synthetic }
    const t = run.trigger
    const ok = t !== null && t.metric === 'p99_latency'
      ? (p99Ms ?? 0) <= t.threshold
      : (errorRate ?? 0) <= (t !== null ? t.threshold : cfg.verification.maxErrorRate)
    return { ok, errorRate, p99Ms, requests: sums.requests, synthetic }
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

  /** `noRealTraffic`: nothing showed that users are served again, but nothing showed they are not. */
  private notRestored (run: Running, noRealTraffic: boolean): void {
    const { incident } = run
    this.running.delete(incident.id)
    const seconds = this.deps.config().verification.timeoutMs / 1000
    const what = `${incident.mitigation?.action ?? 'the mitigation'} ${incident.mitigation?.id ?? ''}`
    incident.status = noRealTraffic ? 'unverified' : 'not_restored'
    if (noRealTraffic) {
      this.deps.logger.error({ event: 'incident', incident: incident.id, phase: 'unverified', checks: incident.checks }, 'restoration not verified: no real traffic since the mitigation')
      this.notify(incident, 'restoration_failed', `NOT verified: no real traffic within ${seconds} s after ${what} (synthetic checks alone do not restore an incident)`)
      return
    }
    this.deps.logger.error({ event: 'incident', incident: incident.id, phase: 'not_restored', checks: incident.checks }, 'the mitigation did not restore service')
    this.notify(incident, 'restoration_failed', `NOT restored: ${what} did not bring service back within ${seconds} s`)
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
