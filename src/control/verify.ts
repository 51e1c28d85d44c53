/**
 * Incidents and verification of restoration (SPEC §11). An incident opens when a trigger
 * fires (detection) or an operator mitigates; when a mitigation is applied, Breakwater checks
 * that service is really back before saying so:
 * - synthetic requests (`verification.synthetics`) sent through this sidecar's own proxy
 *   listener, each expecting its status, `successes` rounds in a row — a synthetic aimed at a
 *   route a mitigation now refuses (kill switch off, circuit forced open, a rate limit too low
 *   to judge the route by) is skipped, since it would measure the mitigation;
 * - and real traffic since the mitigation (the last `windowMs`) under the trigger's threshold
 *   (or `maxErrorRate` for an operator's incident).
 * Real traffic means real (SPEC §15): the verifier's own probes are subtracted from the
 * windows, by what it sent — never by a header a client could forge — and synthetics never
 * restore an incident on their own. Without real traffic the incident ends `unverified`, and is
 * watched until real traffic returns to be judged by (`awaitTraffic`).
 * Both are scoped to the incident: the routes of its trigger's scope that the mitigation does
 * not refuse, or else the rest of the service (routesToJudge).
 * It records detection, mitigation and restoration times, observes
 * `breakwater_time_to_restore_seconds`, and notifies "restoration verified" (PagerDuty resolve)
 * — or, after `timeoutMs`, that the mitigation did not restore service.
 *
 * Escalation (SPEC §19): an incident not verified restored by `escalateAt` (detection +
 * `notifications.escalateAfter`) is escalated, once: a failed verification (`not_restored`)
 * escalates at once, and so does a failed rollback; an `unverified` one (no real traffic to judge by: nobody knows) keeps its
 * deadline, since no evidence says service is down but none says it is back. The deadline is in
 * the persisted record, so a restart re-arms it (and escalates at once if it passed meanwhile);
 * a verified restoration disarms it. An incident escalated before a restart and not restored
 * since has its Alertmanager escalation posted again (`resumeEscalations`).
 *
 * In a fleet (SPEC §16: one incident, one actor) only the incident's actor escalates: the
 * leader, or a sidecar acting alone (no fleet, or etcd did not answer its claim). A follower
 * arms no deadline and sends nothing; it records what its leader reports through etcd (the
 * escalation, the verified restoration), so its incident ends with the fleet's. A follower that
 * takes over arms the deadline of its own detection, unless the leader had escalated already.
 *
 * Every incident is kept in `stateDir` (the newest KEEP): its phases, the detection reading,
 * the triage at detection and its impact (impact.ts), which the post-mortem draft reads.
 */
import { randomBytes } from 'node:crypto'
import { Agent, request } from '../undici.js'
import type { Logger } from 'pino'
import type { Config, TriggerConfig } from '../config/types.js'
import type { RouteStats } from '../proxy/stats.js'
import { emptySums, quantile, wallMsOf, windowMsOf, windowNowMs } from '../proxy/window.js'
import type { MitigationRecord } from '../state/state-file.js'
import type { AuditInput } from '../state/audit-log.js'
import type { NotificationEvent, Notifier } from './notify.js'
import type { Reading } from './triggers.js'
import type { TriageReport } from './triage.js'
import { countImpact, emptyImpact, type Impact } from './impact.js'
import { Deadlines } from './deadlines.js'

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
  /**
   * When the trigger's signal cleared (it re-armed) with no mitigation in force — it only
   * notified, or its mitigation failed — and verification began from then; absent otherwise.
   */
  clearedAt?: string
  /**
   * `status`: a rollback's `running` → `succeeded` | `failed`; `active` for the others; `lifted`
   * once it ended (lifted, restored by hand, handed back to automatic, or its ttl ran out).
   */
  mitigation: { id: string, action: string, status: string, error?: string | null } | null
  timeToMitigateSeconds: number | null
  timeToRestoreSeconds: number | null
  /**
   * In a fleet (SPEC §16): whether this sidecar acts for the incident, and who does; `incident`:
   * the fleet's id of it, as its first leader wrote it on the incident key (absent when the key
   * had none), which its notifications carry instead of `id`.
   */
  fleet?: { role: 'leader' | 'follower', leader: string, incident?: string }
  checks: {
    syntheticRounds: number
    syntheticPassesInARow: number
    lastSynthetic: Array<{ path: string, status: number, expected: number, error?: string }> | null
    errorRate: number | null
    p99Ms: number | null
    /** Real requests since the mitigation, in scope (the verifier's probes excluded). */
    requests: number
    /** The verifier's own probes the windows counted, subtracted from the figures above. */
    syntheticRequests: number
  }
  /** Detection + `escalateAfter`: escalated then unless verified restored. */
  escalateAt: string
  escalatedAt: string | null
  escalationReason: string | null
  /** When verification ended (restored, not restored or unverified). */
  endedAt: string | null
  /**
   * The latest verification: judged on real traffic from `verifyingSince`, until `verifyUntil`.
   * Kept so that a restart resumes it with its own deadline — for one started when real traffic
   * returned to an `unverified` incident, long after the mitigation (absent in older files).
   */
  verifyingSince?: string
  verifyUntil?: string
  /** The trigger's reading when it fired; null for an operator's incident. */
  detection: Detection | null
  /** What triage said at detection: the scenario chosen and those ruled out. */
  triage: { scenario: string, summary: string, recommendation: string, ruledOut: Array<{ scenario: string, why: string }> } | null
  impact: Impact
}

export interface Detection {
  metric: string
  threshold: number
  windowSeconds: number
  value: number
  requests: number
  errors: number
  /** The first second with a failed request in scope within the trigger's window (null: none held). */
  firstFailureAt: string | null
}

/** The notification events the verifier sends about an incident. */
type IncidentEventKind = 'restoration_verified' | 'restoration_failed' | 'escalated'

const OPEN = new Set<Incident['status']>(['detected', 'verifying'])
/** How often the impact of open incidents is counted from the windows (well inside the 128 s they hold). */
const COUNT_EVERY_MS = 5000
/** Real requests verification needs in its window to judge (fewer, if the trigger's `minRequests` is lower). */
const MIN_REQUESTS = 10

/** Upper bounds in seconds of the time-to-restore histogram. */
export const TTR_BUCKETS = [1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600] as const

export interface VerifierDeps {
  config: () => Config
  /** The proxy listener's URL (synthetics go through Breakwater itself). */
  proxy: () => string
  /**
   * TLS options for reaching that listener when it serves HTTPS (its own certificate as the
   * client certificate, for a mutual-TLS listener), read for each round; null for plain HTTP.
   */
  proxyTls: () => Record<string, unknown> | null
  stats: () => Iterable<RouteStats>
  /** Whether a mitigation refuses a route now (its kill switch off, or its circuit forced open). */
  refusedByMitigation: (route: string) => boolean
  /** The requests per second a route's rate limit admits for the whole route (key `route`); null when no such limit caps it. */
  routeRateLimit: (route: string) => number | null
  /** The route and upstream a request would take (where a probe is counted), or null. */
  routeOf: (method: string, path: string, host: string | null) => { route: string } | null
  /** The data plane's probe key: a probe that carries it is told back (`probeEnded`), never counted as real. */
  probeKey: () => string
  notifier: Notifier
  logger: Logger
  /** Persist every incident (as they are now), with an audit line when given. */
  persist: (entry: AuditInput | null) => void
  /** Told when this sidecar escalated an incident or verified its restoration (a fleet leader passes it on). */
  progressed?: (incident: Incident, change: { escalatedAt: string } | { restoredAt: string }) => void
  /**
   * In a fleet: whether this sidecar, the leader of `incident`, still holds it (SPEC §16: never act
   * on a lease it cannot prove it still holds). A promise when only etcd can say; a leader that
   * learns it lost the incident has stepped down (`stepDown`) by the time it resolves.
   */
  leading?: (incident: Incident) => boolean | Promise<boolean>
  /** The triage report now (kept in the incident at detection). */
  triage: () => TriageReport
}

/** One probe the data plane left out of the windows: told in the figures as left out. */
interface Probe {
  second: number
  route: string
}

interface Running {
  incident: Incident
  trigger: TriggerConfig | null
  /**
   * Verification judges real traffic from here (the mitigation, or the signal clearing) until
   * `deadline`: both on the window clock (window.ts), so a step of the wall clock neither hides
   * the traffic since nor moves the deadline.
   */
  since: number
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
  /**
   * Every probe the data plane left out of the windows (`probeEnded`), whichever incident sent
   * it, for the figures that say how many were left out. Kept until no window read and no
   * impact count can reach its second (`forgetProbes`).
   */
  private probes: Probe[] = []
  private readonly escalations = new Deadlines()
  /** Incidents that ended `unverified`, watched until real traffic returns to judge them by (`awaitTraffic`). */
  private readonly awaiting = new Map<string, NodeJS.Timeout>()
  /** Escalations of incidents led here before a restart, posted again once the fleet says this sidecar still leads (`rejoined`). */
  private readonly heldBack = new Set<string>()
  private counter: NodeJS.Timeout | null = null
  private stopped = false
  /** The first second this process holds traffic for (earlier spans are gaps in an impact), on the window clock. */
  private readonly heldSince = Math.floor(windowNowMs() / 1000)

  constructor (private readonly deps: VerifierDeps) {}

  /**
   * Take back the incidents an earlier run persisted: open ones resume verification (their
   * mitigation is still in force) and every unescalated one not restored re-arms its deadline.
   * With a `fleet`, the escalations of incidents this sidecar led wait for `rejoined`.
   */
  restore (saved: readonly unknown[], fleet = false): void {
    const loaded = saved.filter((x): x is Incident => typeof x === 'object' && x !== null && typeof (x as Incident).id === 'string' && typeof (x as Incident).escalateAt === 'string' && typeof (x as Incident).impact === 'object')
    this.incidents.splice(0, this.incidents.length, ...loaded.slice(0, KEEP))
    // First: an incident escalated below, at this start, posts its escalation as it escalates.
    this.resumeEscalations(fleet)
    for (const incident of this.incidents) {
      const since = incident.verifyingSince ?? incident.clearedAt ?? incident.mitigatedAt
      if (incident.status === 'verifying' && since !== null) {
        const trigger = incident.trigger === null ? null : this.deps.config().rollbackTriggers.find((t) => t.name === incident.trigger) ?? null
        // Its own deadline: counted from the mitigation, it would end at once a verification
        // started when real traffic returned to an unverified incident.
        const deadline = incident.verifyUntil !== undefined ? Date.parse(incident.verifyUntil) : Date.parse(since) + this.deps.config().verification.timeoutMs
        const run: Running = { incident, trigger, since: windowMsOf(Date.parse(since)), timer: null, deadline: windowMsOf(deadline), busy: false }
        this.running.set(incident.id, run)
        this.schedule(run, Math.min(250, this.deps.config().verification.intervalMs))
        this.deps.logger.warn({ event: 'incident', incident: incident.id, phase: 'resumed' }, 'verification of an open incident resumed after a restart')
      }
      if (incident.status === 'not_restored') this.escalate(incident, 'the mitigation did not restore service')
      else if (incident.status !== 'restored') this.arm(incident)
      if (this.awaitsTraffic(incident)) this.awaitTraffic(incident)
    }
    this.countOpen()
  }

  /**
   * Escalations last until restoration is verified, and a restart must not end them by silence
   * (Alertmanager resolves an alert nobody posts again within its `resolve_timeout`). Posted
   * again: the escalation of each incident this sidecar acts for that escalated before the
   * restart, is not restored, and can still end here the way it would have without the restart —
   * open (its verification resumes, or its trigger's next mitigation is verified), or of the
   * running version (a later incident of its trigger, restored, ends it) — unless a later incident
   * of the same version and trigger was restored after it escalated. Oldest first, as they
   * escalated: the alert starts when the first did. In a fleet, the escalation of an incident this
   * sidecar led waits for the fleet to say who leads it now (`rejoined`): another sidecar may have
   * taken it over meanwhile, and posts it.
   */
  private resumeEscalations (fleet: boolean): void {
    const version = this.deps.config().version
    for (const incident of [...this.incidents].reverse()) {
      const at = incident.escalatedAt
      if (at === null || incident.status === 'restored' || incident.fleet?.role === 'follower') continue
      const endedSince = this.incidents.some((i) => i.status === 'restored' && i.version === incident.version && i.trigger === incident.trigger && i.restoredAt !== null && i.restoredAt >= at)
      if (endedSince) continue
      if (!OPEN.has(incident.status) && !this.awaitsTraffic(incident) && incident.version !== version) {
        this.deps.logger.info({ event: 'incident', incident: incident.id, phase: 'escalation_not_resumed', status: incident.status, version: incident.version }, 'escalation of a closed incident of a version no longer running is not posted again')
        continue
      }
      if (fleet && incident.fleet?.role === 'leader' && incident.trigger !== null) this.heldBack.add(incident.id)
      else this.postEscalation(incident)
    }
  }

  /** Post the escalation of `incident`, escalated earlier (before a restart, or by the leader it takes over from), again to Alertmanager. */
  private postEscalation (incident: Incident, message = 'escalation of an incident not restored before the restart posted again'): void {
    this.deps.logger.info({ event: 'incident', incident: incident.id, phase: 'escalation_resumed', escalatedAt: incident.escalatedAt }, message)
    this.deps.notifier.alertmanager.resumeEscalation(this.event(incident, 'escalated', escalationSummary(incident, incident.escalationReason ?? 'escalated before a restart')))
  }

  /**
   * The fleet incidents of an earlier run that can still go on here: the open ones, and the
   * escalated ones whose escalation is held back. Each one this sidecar led is claimed again
   * (SPEC §16) and `rejoined` told the answer; for each one it followed, the key is read again,
   * since the leader may have changed meanwhile (`fleetRole`).
   */
  rejoining (): ReadonlyArray<Pick<Incident, 'id' | 'version'> & { trigger: string, fleet: NonNullable<Incident['fleet']> }> {
    return this.incidents.flatMap((i) => i.trigger !== null && i.fleet !== undefined && (OPEN.has(i.status) || this.heldBack.has(i.id)) ? [{ id: i.id, version: i.version, trigger: i.trigger, fleet: i.fleet }] : [])
  }

  /**
   * The fleet answered who leads incident `id`, led here before a restart (`rejoining`). Still this
   * sidecar, or nobody reachable (null: it acts alone): it goes on as before, its escalation
   * posted again. Another sidecar, which took it over meanwhile: this one follows it — no
   * escalation deadline, no escalation of its own — and records the leader's progress.
   */
  rejoined (id: string, claim: { leader: boolean, holder: string, incident?: string } | null): void {
    const held = this.heldBack.delete(id)
    const incident = this.incidents.find((i) => i.id === id)
    if (incident === undefined || this.stopped || incident.status === 'restored') return
    if (claim === null || claim.leader) {
      if (held) this.postEscalation(incident)
      return
    }
    const fleetIncident = claim.incident ?? incident.fleet?.incident
    incident.fleet = fleetIncident !== undefined ? { role: 'follower', leader: claim.holder, incident: fleetIncident } : { role: 'follower', leader: claim.holder }
    this.escalations.disarm(incident.id)
    this.deps.logger.info({ event: 'incident', incident: incident.id, phase: 'following', leader: claim.holder }, `${claim.holder} took the incident over while this sidecar was away; following`)
    this.deps.persist(null)
  }

  /** A trigger fired: an incident is detected (one open incident per trigger). */
  /** The trigger's open incident, or a new one; `opened` when this firing opened it. */
  triggerFired (trigger: TriggerConfig, at: number, reading: Reading | null = null): { incident: Incident, opened: boolean } {
    const open = this.incidents.find((i) => i.trigger === trigger.name && OPEN.has(i.status))
    if (open !== undefined) return { incident: open, opened: false }
    const detection = reading === null ? null : { metric: trigger.metric, threshold: trigger.threshold, windowSeconds: trigger.windowMs / 1000, value: Math.round(reading.value * 1e4) / 1e4, requests: reading.requests, errors: reading.errors, firstFailureAt: this.firstFailure(trigger, at) }
    return { incident: this.open(trigger.name, { route: trigger.route, upstream: trigger.upstream }, at, detection, trigger.windowMs), opened: true }
  }

  /** The first second with a failure in the trigger's scope within its window before `at` (second resolution only). */
  private firstFailure (trigger: TriggerConfig, at: number): string | null {
    const routes = this.routesInScope({ route: trigger.route, upstream: trigger.upstream })
    const to = Math.floor(windowMsOf(at) / 1000) + 1
    const from = Math.max(to - Math.ceil(trigger.windowMs / 1000), to - 120)
    const stats = [...this.deps.stats()].filter((s) => routes.has(s.route))
    for (let second = from; second < to; second++) {
      const one = emptySums(false)
      for (const s of stats) s.window.sum(second, second + 1, one)
      if (one.errors > 0) return new Date(wallMsOf(second * 1000)).toISOString()
    }
    return null
  }

  private open (trigger: string | null, scope: Incident['scope'], at: number, detection: Detection | null = null, lookBackMs = 0): Incident {
    const cfg = this.deps.config()
    const windowAt = windowMsOf(at)
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
      checks: { syntheticRounds: 0, syntheticPassesInARow: 0, lastSynthetic: null, errorRate: null, p99Ms: null, requests: 0, syntheticRequests: 0 },
      escalateAt: new Date(at + cfg.notifications.escalateAfterMs).toISOString(),
      escalatedAt: null,
      escalationReason: null,
      endedAt: null,
      detection,
      triage: this.triageNow(),
      // The failures that fired the trigger are part of the impact: count from its window's start.
      impact: emptyImpact(Math.max(Math.floor((windowAt - lookBackMs) / 1000), Math.floor(windowAt / 1000) - 120, this.heldSince))
    }
    this.incidents.unshift(incident)
    if (this.incidents.length > KEEP) this.incidents.length = KEEP
    this.deps.logger.warn({ event: 'incident', incident: incident.id, phase: 'detected', trigger, escalateAt: incident.escalateAt }, 'incident detected')
    this.count(incident)
    this.arm(incident)
    // An operator's incident opens with the operator's own audited action: one line per command.
    this.deps.persist(trigger === null ? null : { action: 'incident.detected', targets: [incident.id], reason: `trigger ${trigger} fired`, result: 'detected', requester: `trigger:${trigger}`, trigger, version: incident.version })
    this.countOpen()
    return incident
  }

  private triageNow (): Incident['triage'] {
    try {
      const r = this.deps.triage()
      return { scenario: r.scenario, summary: r.summary, recommendation: `${r.recommendation.action}${r.recommendation.target !== null ? ` ${r.recommendation.target}` : ''}`, ruledOut: r.ruledOut.map((x) => ({ scenario: x.scenario, why: x.why })) }
    } catch (err) {
      this.deps.logger.warn({ event: 'incident_triage_failed', error: (err as Error).message }, 'triage at detection failed; the incident keeps none')
      return null
    }
  }

  /** The routes of an incident's scope, whatever mitigations refuse now (its impact is counted on these). */
  routesInScope (scope: Incident['scope']): Set<string> {
    return new Set(this.deps.config().routes.filter((r) => (scope.route === null || r.name === scope.route) && (scope.upstream === null || r.upstream === scope.upstream)).map((r) => r.name))
  }

  /**
   * One of `incident`'s probes ended in the data plane on `route` at `atMs`: the windows left it
   * out of the real traffic, its latency and the impact; `checks.syntheticRequests` and
   * `impact.probesExcluded` say how many.
   */
  probeEnded (incident: string, route: string, atMs: number): void {
    if (this.incidents.some((i) => i.id === incident)) this.probes.push({ second: Math.floor(atMs / 1000), route })
  }

  /**
   * Forget the probes no figure can count any more: older than the verification window, and
   * than every open incident's impact counted so far (it counts whole seconds, behind).
   */
  private forgetProbes (now: number): void {
    let keepFrom = Math.floor((now - this.deps.config().verification.windowMs) / 1000)
    for (const i of this.incidents) if (OPEN.has(i.status) && i.impact.countedUntil < keepFrom) keepFrom = i.impact.countedUntil
    if (this.probes.length > 0 && (this.probes[0] as Probe).second < keepFrom) this.probes = this.probes.filter((p) => p.second >= keepFrom)
  }

  /** Count an incident's impact up to the last whole second before now. */
  private count (incident: Incident): void {
    const probes = this.probes
    const scope = this.routesInScope(incident.scope)
    // Only probes on the incident's routes would have been in its figures.
    const of = (second: number): number => {
      let requests = 0
      for (const p of probes) if (p.second === second && scope.has(p.route)) requests++
      return requests
    }
    countImpact(incident.impact, this.deps.stats(), scope, Math.floor(windowNowMs() / 1000), this.heldSince, of)
  }

  /** While an incident is open, count its impact every few seconds (a timer only while one is). */
  private countOpen (): void {
    if (this.stopped || this.counter !== null || !this.incidents.some((i) => OPEN.has(i.status))) return
    this.counter = setInterval(() => {
      const open = this.incidents.filter((i) => OPEN.has(i.status))
      for (const i of open) this.count(i)
      if (open.length === 0 && this.counter !== null) { clearInterval(this.counter); this.counter = null }
    }, COUNT_EVERY_MS)
    this.counter.unref()
  }

  /** Escalate `incident` at its deadline unless it is verified restored first. */
  private arm (incident: Incident): void {
    if (this.stopped || incident.escalatedAt !== null || incident.status === 'restored' || incident.fleet?.role === 'follower') return
    const why = `not verified restored within ${this.deps.config().notifications.escalateAfterMs / 1000} s of detection`
    this.escalations.arm(incident.id, Date.parse(incident.escalateAt), () => { this.escalate(incident, why) })
  }

  /** Incidents whose escalation deadline is armed now. */
  get armedEscalations (): number {
    return this.escalations.size
  }

  /** Escalate once per incident: PagerDuty `critical`, Slack, webhooks (SPEC §19). */
  private escalate (incident: Incident, why: string, confirmed = false): void {
    this.escalations.disarm(incident.id)
    // A follower never escalates: its leader does, once for the fleet (SPEC §16).
    if (this.stopped || incident.escalatedAt !== null || incident.status === 'restored' || incident.fleet?.role === 'follower') return
    if (!confirmed && !this.leads(incident, () => { this.escalate(incident, why, true) })) return
    incident.escalatedAt = new Date().toISOString()
    incident.escalationReason = why
    this.deps.logger.error({ event: 'incident', incident: incident.id, phase: 'escalated', reason: why, status: incident.status }, 'incident escalated')
    this.notify(incident, 'escalated', escalationSummary(incident, why))
    this.deps.persist({ action: 'incident.escalated', targets: [incident.id], reason: why, result: 'escalated', requester: 'breakwater', trigger: incident.trigger, status: incident.status })
    this.deps.progressed?.(incident, { escalatedAt: incident.escalatedAt })
  }

  /**
   * In a fleet, the claim of `trigger`'s open incident decided who acts (SPEC §16): a follower
   * disarms its deadline (the leader escalates for the fleet); the leader — the first claimant,
   * or a follower taking over from a leader that left — arms it, at the time fixed at its own
   * detection (at once if that passed), unless the fleet already escalated.
   */
  fleetRole (trigger: string, role: 'leader' | 'follower', leader: string, fleetIncident?: string): void {
    const incident = this.incidents.find((i) => i.trigger === trigger && OPEN.has(i.status))
    if (incident === undefined) return
    const was = incident.fleet
    const id = fleetIncident ?? was?.incident
    incident.fleet = id !== undefined ? { role, leader, incident: id } : { role, leader }
    if (role === 'follower') {
      this.escalations.disarm(incident.id)
      // A sidecar that escalated before a restart and follows now: the leader posts the escalation.
      this.deps.notifier.alertmanager.dropEscalation(incident.version, incident.trigger)
    } else {
      this.arm(incident)
      // Taking over an incident its leader escalated: the fleet's escalation alert goes on from
      // here, re-posted until restoration is verified (not escalated again).
      if (was?.role === 'follower' && incident.escalatedAt !== null) this.postEscalation(incident, 'escalation of the incident taken over posted again, now by this sidecar')
    }
    this.deps.persist(null)
  }

  /**
   * Whether this sidecar may act for `incident` now: true but for a fleet leader that cannot prove
   * at once that it still holds it (`leading`); `then` runs once etcd says it does (or cannot say:
   * then this sidecar acts alone, as when etcd does not answer a claim).
   */
  private leads (incident: Incident, then: () => void): boolean {
    if (incident.fleet?.role !== 'leader' || this.deps.leading === undefined) return true
    const held = this.deps.leading(incident)
    if (typeof held === 'boolean') return held
    void held.then((yes) => { if (yes && !this.stopped && incident.fleet?.role === 'leader') then() })
    return false
  }

  /**
   * This sidecar (`self`) led `trigger`'s open incident and lost the fleet's incident key: its
   * lease lapsed (the process frozen or starved past its ttl), or another sidecar holds the key
   * (SPEC §16). It acts no more — no escalation deadline, no verification of its own — and
   * follows the key's last holder, itself, until it learns who holds it now (`followHolder`), or
   * takes it back as any follower whose leader left. True when it was leading.
   */
  stepDown (trigger: string, self: string): boolean {
    const incident = this.incidents.find((i) => i.trigger === trigger && OPEN.has(i.status) && i.fleet?.role === 'leader')
    if (incident === undefined) return false
    const run = this.running.get(incident.id)
    if (run?.timer != null) clearTimeout(run.timer)
    this.running.delete(incident.id)
    // Its holder verifies now; taken back, it verifies again from then (`succeed`).
    if (incident.status === 'verifying') incident.status = 'detected'
    this.fleetRole(trigger, 'follower', self)
    return true
  }

  /**
   * `leader` holds the fleet's incident of `trigger` now. A follower of another one (its leader
   * left while this sidecar read the fleet state afresh, so it never saw the key released) follows
   * this one from now on, or the new leader's escalation and restoration would not count here.
   * True when it changed.
   */
  followHolder (trigger: string, leader: string, fleetIncident?: string): boolean {
    const incident = this.incidents.find((i) => i.trigger === trigger && OPEN.has(i.status) && i.fleet?.role === 'follower')
    if (incident === undefined || incident.fleet?.leader === leader) return false
    this.fleetRole(trigger, 'follower', leader, fleetIncident)
    return true
  }

  /**
   * The fleet leader of `trigger`'s incident escalated it or verified its restoration: this
   * follower records it, without notifying (the leader did) and without observing a time to
   * restore (the leader's counts, once for the fleet).
   */
  leaderProgress (trigger: string, leader: string, news: { escalatedAt?: string, restoredAt?: string }): Incident | null {
    const incident = this.incidents.find((i) => i.trigger === trigger && i.fleet?.role === 'follower' && i.fleet.leader === leader && i.status !== 'restored')
    if (incident === undefined) return null
    if (news.escalatedAt !== undefined && incident.escalatedAt === null) {
      incident.escalatedAt = news.escalatedAt
      incident.escalationReason = `escalated by the fleet leader ${leader}`
      this.deps.logger.info({ event: 'incident', incident: incident.id, phase: 'escalated', leader }, 'incident escalated by the fleet leader')
      this.deps.persist({ action: 'incident.escalated', targets: [incident.id], reason: incident.escalationReason, result: 'escalated by the leader', requester: `fleet:${leader}`, trigger, status: incident.status })
    }
    if (news.restoredAt !== undefined) {
      const run = this.running.get(incident.id)
      if (run?.timer != null) clearTimeout(run.timer)
      this.running.delete(incident.id)
      this.escalations.disarm(incident.id)
      this.count(incident)
      incident.status = 'restored'
      incident.restoredAt = news.restoredAt
      incident.endedAt = news.restoredAt
      incident.timeToRestoreSeconds = round((Date.parse(news.restoredAt) - Date.parse(incident.detectedAt)) / 1000)
      this.deps.logger.info({ event: 'incident', incident: incident.id, phase: 'restored', leader, timeToRestoreSeconds: incident.timeToRestoreSeconds }, 'restoration verified by the fleet leader')
      this.deps.persist({ action: 'incident.restored', targets: [incident.id], reason: `restoration verified by the fleet leader ${leader}`, result: 'restored', requester: `fleet:${leader}`, trigger, timeToRestoreSeconds: incident.timeToRestoreSeconds })
    }
    return incident
  }

  /**
   * The open incident a mitigation belongs to (its trigger's, or the one it already joined),
   * opened if none. An operator's rollback acts within the newest open incident of the running
   * version this sidecar acts for — a trigger's, or the one an earlier operator rollback opened —
   * since a rollback answers whatever outage that version is in: one incident per outage, not
   * one more per command. An operator's kill switch, circuit break, failover or rate limit acts
   * within the newest open trigger's incident of the running version whose scope it touches (a
   * route of its scope killed, limited, or served by the upstream broken or failed over): it is
   * that outage's mitigation, verified, announced and resolved as the trigger's would be.
   */
  private incidentOf (record: MitigationRecord, at: number): { incident: Incident, trigger: TriggerConfig | null } {
    const cfg = this.deps.config()
    const triggerName = record.source.startsWith('trigger:') ? record.source.slice(8) : null
    let incident = this.incidents.find((i) => i.mitigation?.id === record.id)
    if (incident === undefined && triggerName !== null) incident = this.incidents.find((i) => i.trigger === triggerName && OPEN.has(i.status))
    if (incident === undefined && triggerName === null && record.action === 'rollback') {
      incident = this.incidents.find((i) => OPEN.has(i.status) && i.version === cfg.version && i.fleet?.role !== 'follower')
    }
    if (incident === undefined && triggerName === null && record.action !== 'rollback') {
      const touched = this.routesTouched(record)
      incident = this.incidents.find((i) => i.trigger !== null && OPEN.has(i.status) && i.version === cfg.version && i.fleet?.role !== 'follower' && [...this.routesInScope(i.scope)].some((r) => touched.has(r)))
    }
    const name = incident?.trigger ?? triggerName
    const trigger = name === null ? null : cfg.rollbackTriggers.find((t) => t.name === name) ?? null
    incident ??= this.open(triggerName, { route: trigger?.route ?? null, upstream: trigger?.upstream ?? null }, at)
    return { incident, trigger }
  }

  /** The routes a kill switch, circuit break, failover or rate limit acts on. */
  private routesTouched (record: MitigationRecord): Set<string> {
    const targets = new Set(record.targets)
    const routes = this.deps.config().routes.filter((r) => {
      if (record.action === 'killSwitch') return r.killSwitch !== null && targets.has(r.killSwitch)
      if (record.action === 'rateLimit') return targets.has(r.name)
      return targets.has(r.upstream)
    })
    return new Set(routes.map((r) => r.name))
  }

  /** A rollback started (it runs in the background): the incident shows it, not yet verified. */
  mitigationStarted (record: MitigationRecord, at = Date.now()): Incident {
    const { incident } = this.incidentOf(record, at)
    incident.mitigation = { id: record.id, action: record.action, status: record.status }
    this.deps.persist(null)
    return incident
  }

  /** A rollback's action failed: the incident stays open, says so, and is escalated at once (nothing is restoring service). */
  mitigationFailed (record: MitigationRecord, at = Date.now()): Incident {
    const { incident } = this.incidentOf(record, at)
    incident.mitigation = { id: record.id, action: record.action, status: record.status, error: record.error ?? null }
    this.deps.logger.error({ event: 'incident', incident: incident.id, phase: 'mitigation_failed', mitigation: record.id, action: record.action, error: record.error }, 'the mitigation failed; the incident stays open')
    this.deps.persist(null)
    this.escalate(incident, `the ${record.action} ${record.id} failed: ${record.error ?? 'no reason given'}`)
    // An operator's incident has no trigger whose signal clearing would end it: with nothing in
    // force it is judged on real traffic from now, so that it does not stay open for good.
    if (incident.trigger === null && incident.status === 'detected') this.verifyUnmitigated(incident, at)
    return incident
  }

  /** Judge `incident`, with no mitigation in force, on real traffic from `at` (`clearedAt`). */
  private verifyUnmitigated (incident: Incident, at: number): void {
    incident.clearedAt = new Date(at).toISOString()
    incident.endedAt = null
    this.startVerifying(incident, null, at)
    this.deps.logger.warn({ event: 'incident', incident: incident.id, phase: 'cleared' }, `no mitigation in force ${clearedWhy(incident)}; verifying restoration on real traffic`)
    this.deps.persist({ action: 'incident.cleared', targets: [incident.id], reason: `no mitigation in force ${clearedWhy(incident)}`, result: 'verifying', requester: 'breakwater', trigger: null })
    this.countOpen()
  }

  /**
   * A mitigation ended — lifted, or what it changed undone by hand (a restore, `circuit auto`) or
   * by its ttl: the incidents it mitigated show it ended. Verification goes on as it was: whether
   * service is back is judged on the traffic, not on what is in force.
   */
  mitigationLifted (record: MitigationRecord): void {
    let changed = false
    for (const incident of this.incidents) {
      if (incident.mitigation?.id !== record.id) continue
      incident.mitigation = { ...incident.mitigation, status: record.status }
      changed = true
    }
    if (changed) this.deps.persist(null)
  }

  /** A mitigation was applied: verify that it restored service. */
  mitigated (record: MitigationRecord, at = Date.now()): Incident {
    const { incident, trigger } = this.incidentOf(record, at)
    this.verifyFrom(incident, trigger, { id: record.id, action: record.action, status: record.status }, at)
    incident.timeToMitigateSeconds = round((at - Date.parse(incident.detectedAt)) / 1000)
    this.deps.logger.warn({ event: 'incident', incident: incident.id, phase: 'mitigated', mitigation: record.id, action: record.action, timeToMitigateSeconds: incident.timeToMitigateSeconds }, 'incident mitigated; verifying restoration')
    const cfg = this.deps.config()
    this.deps.notifier.pageStatus({ service: cfg.service, version: incident.version, trigger: incident.trigger, summary: `${record.action} applied; verifying that service is restored` }, 'monitoring')
    this.deps.persist(null)
    this.countOpen()
    return incident
  }

  /** Verify from `at` that `mitigation` restored service (a verification already running starts over). */
  private verifyFrom (incident: Incident, trigger: TriggerConfig | null, mitigation: NonNullable<Incident['mitigation']>, at: number): void {
    incident.mitigatedAt = new Date(at).toISOString()
    incident.mitigation = mitigation
    delete incident.clearedAt
    this.startVerifying(incident, trigger, at)
  }

  /** Judge restoration from `at` on, until `deadline` (a verification already running starts over). */
  private startVerifying (incident: Incident, trigger: TriggerConfig | null, at: number, deadline = at + this.deps.config().verification.timeoutMs): void {
    const previous = this.running.get(incident.id)
    if (previous?.timer != null) clearTimeout(previous.timer)
    incident.status = 'verifying'
    incident.verifyingSince = new Date(at).toISOString()
    incident.verifyUntil = new Date(deadline).toISOString()
    incident.checks.syntheticPassesInARow = 0
    const run: Running = { incident, trigger, since: windowMsOf(at), timer: null, deadline: windowMsOf(deadline), busy: false }
    this.running.set(incident.id, run)
    this.schedule(run, Math.min(250, this.deps.config().verification.intervalMs))
  }

  /**
   * `trigger` re-armed — its metric stayed under the threshold for a whole window — while its
   * incident here has nothing to verify: the trigger only notified, or its mitigation failed, or
   * its mitigation was judged `not_restored` (escalated, the outage went on). Service came back
   * without a mitigation that brought it back, and left alone the incident would stay open for
   * good, its page (escalated) and status page incident with it. Restoration is verified on real traffic
   * from now, as after a mitigation: restored, the incident ends and is resolved everywhere it was
   * announced; not, it is escalated. Only the incident's actor does this (a follower's leader does,
   * for the fleet); an incident whose mitigation is still running waits for its result.
   */
  signalCleared (trigger: string, at = Date.now()): Incident | null {
    // The trigger's newest incident: open, or closed `not_restored` — its mitigation did not
    // bring service back, it was escalated, and its page and status page incident are still open.
    const incident = this.incidents.find((i) => i.trigger === trigger)
    if (incident === undefined || incident.fleet?.role === 'follower') return null
    const failedToRestore = incident.status === 'not_restored'
    if (!failedToRestore && (incident.status !== 'detected' || (incident.mitigation !== null && incident.mitigation.status !== 'failed'))) return null
    const config = this.deps.config().rollbackTriggers.find((t) => t.name === trigger) ?? null
    incident.clearedAt = new Date(at).toISOString()
    incident.endedAt = null
    this.startVerifying(incident, config, at)
    const why = clearedWhy(incident)
    this.deps.logger.warn({ event: 'incident', incident: incident.id, phase: 'cleared', trigger }, `the trigger's signal cleared ${why}; verifying restoration`)
    const cfg = this.deps.config()
    this.deps.notifier.pageStatus({ service: cfg.service, version: incident.version, trigger: incident.trigger, summary: `the error signal cleared ${why}; verifying that service is restored` }, 'monitoring')
    this.deps.persist({ action: 'incident.cleared', targets: [incident.id], reason: `trigger ${trigger} re-armed ${why}`, result: 'verifying', requester: `trigger:${trigger}`, trigger })
    this.countOpen()
    return incident
  }

  /** Whether `trigger`'s open incident here follows `leader`. */
  follows (trigger: string, leader: string): boolean {
    return this.openFollowing(trigger, leader) !== undefined
  }

  private openFollowing (trigger: string, leader: string): Incident | undefined {
    return this.incidents.find((i) => i.trigger === trigger && OPEN.has(i.status) && i.fleet?.role === 'follower' && i.fleet.leader === leader)
  }

  /**
   * The leader of `trigger`'s incident, followed here, left after acting and before restoration
   * was verified, and this sidecar (`self`) holds the incident now (SPEC §16). It does not act
   * again; it carries the rest on: the leader's mitigation verified on its own traffic from now,
   * its own escalation deadline (at once if passed, unless the leader escalated), and the
   * escalation alert if the leader had escalated.
   */
  succeed (trigger: string, previous: string, self: string, action: string): Incident | null {
    const incident = this.openFollowing(trigger, previous)
    if (incident === undefined) return null
    this.fleetRole(trigger, 'leader', self)
    if (incident.status === 'detected') {
      const config = this.deps.config().rollbackTriggers.find((t) => t.name === trigger) ?? null
      this.verifyFrom(incident, config, { id: `fleet:${previous}`, action, status: 'applied' }, Date.now())
      this.deps.logger.warn({ event: 'incident', incident: incident.id, phase: 'succeeded', previousLeader: previous, action }, `the fleet leader ${previous} left after its ${action}; verifying restoration here`)
    }
    this.deps.persist(null)
    this.countOpen()
    return incident
  }

  private schedule (run: Running, ms: number): void {
    if (this.stopped) return
    run.timer = setTimeout(() => { void this.check(run) }, ms)
    run.timer.unref()
  }

  private async check (run: Running, confirmed = false): Promise<void> {
    const { incident } = run
    // A fleet leader that cannot prove it still holds the incident judges nothing until etcd says.
    if (!confirmed && !this.leads(incident, () => { if (this.running.get(incident.id) === run) void this.check(run, true) })) return
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
      let agent: Agent | null = null
      let tlsProblem: string | null = null
      try {
        const tls = this.deps.proxyTls()
        if (tls !== null) agent = new Agent({ connect: tls })
      } catch (err) {
        tlsProblem = `the proxy listener's certificate files cannot be read: ${(err as Error).message}`
      }
      const results = await Promise.all(synthetics.map(async (s) => {
        let status = 0
        let error: string | null = tlsProblem
        if (error === null) {
          try {
            const res = await request(`${this.deps.proxy()}${s.path}`, {
              method: s.method as 'GET',
              headers: { 'x-breakwater-synthetic': incident.id, 'x-breakwater-probe': this.deps.probeKey(), 'user-agent': 'breakwater-verify', ...(s.host !== null ? { host: s.host } : {}) },
              headersTimeout: 5000,
              bodyTimeout: 5000,
              ...(agent !== null ? { dispatcher: agent } : {})
            })
            await res.body.dump()
            status = res.statusCode
          } catch (err) {
            // Status 0: failed. Said in the incident's checks, so a probe that cannot reach the
            // listener (TLS, a refused connection) is told apart from a failing service.
            error = (err as Error).message
          }
        }
        // The data plane leaves it out of its windows and tells `probeEnded`, to say so.
        return { path: s.path, status, expected: s.expectStatus, ...(error !== null ? { error } : {}) }
      }))
      if (agent !== null) void agent.close().catch(() => {})
      incident.checks.syntheticRounds++
      incident.checks.lastSynthetic = results
      syntheticsOk = results.every((r) => r.status === r.expected)
      incident.checks.syntheticPassesInARow = syntheticsOk ? incident.checks.syntheticPassesInARow + 1 : 0
    }
    // A run replaced while its probes were out (another mitigation started verification over)
    // stops here: the new run judges, with its own deadline.
    if (this.stopped || incident.status !== 'verifying' || this.running.get(incident.id) !== run) return
    // Before readTraffic forgets old probes: the impact leaves them out too.
    this.count(incident)
    const traffic = this.readTraffic(run, routes, windowNowMs())
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
    if (windowNowMs() >= run.deadline) { this.notRestored(run, traffic.ok === null && syntheticsOk); return }
    this.schedule(run, v.intervalMs)
  }

  /**
   * The routes whose traffic and synthetics judge an incident: those of its scope (its
   * trigger's route and upstream) that no mitigation refuses now — a refused route would only
   * measure the mitigation. When the mitigation refuses the whole scope (a kill switch of the
   * failing route, a circuit forced open on the failing upstream, a rate limit that sheds the
   * route), what is left to judge is the rest of the service, every route it does not refuse.
   */
  private routesToJudge (incident: Incident): Set<string> {
    const { scope } = incident
    const serving = this.deps.config().routes.filter((r) => !this.deps.refusedByMitigation(r.name) && !this.shed(r.name))
    const inScope = serving.filter((r) => (scope.route === null || r.name === scope.route) && (scope.upstream === null || r.upstream === scope.upstream))
    return new Set((inScope.length > 0 ? inScope : serving).map((r) => r.name))
  }

  /**
   * Whether a route's rate limit sheds it as a kill switch would: it admits fewer requests in a
   * verification window than verification needs, so what it lets through can never show service
   * back, and a probe of it would only measure the limit (429, a `breakwater` refusal). A limit
   * keyed by client or header caps no route as a whole.
   */
  private shed (route: string): boolean {
    const rps = this.deps.routeRateLimit(route)
    return rps !== null && rps * this.deps.config().verification.windowMs / 1000 < MIN_REQUESTS
  }

  /** Real traffic since the mitigation: ok (true), not ok (false), or too little to say (null). */
  private readTraffic (run: Running, routes: ReadonlySet<string>, now: number): { ok: boolean | null, errorRate: number | null, p99Ms: number | null, requests: number, synthetic: number } {
    const cfg = this.deps.config()
    const since = Math.max(run.since, now - cfg.verification.windowMs)
    // Whole seconds after the mitigation only: the second it happened in still holds the failures.
    const from = Math.floor(since / 1000) + 1
    const to = Math.floor(now / 1000) + 1
    const sums = emptySums(true)
    for (const s of this.deps.stats()) {
      if (routes.has(s.route)) s.window.sum(from, to, sums)
    }
    // The verifier's own probes are not real traffic, nor their latencies: a p99_latency
    // incident is judged by what users waited (SPEC §15). The windows never counted them; this
    // says how many were left out.
    const latency = sums.latency as Float64Array
    let synthetic = 0
    for (const p of this.probes) if (p.second >= from && p.second < to && routes.has(p.route)) synthetic++
    this.forgetProbes(now)
    const errorRate = sums.requests === 0 ? null : sums.errors / sums.requests
    const p99Ms = quantile(latency, 0.99)
    const minRequests = Math.min(run.trigger?.minRequests ?? MIN_REQUESTS, MIN_REQUESTS)
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
    this.count(incident)
    this.running.delete(incident.id)
    this.escalations.disarm(incident.id)
    incident.status = 'restored'
    incident.restoredAt = new Date(now).toISOString()
    incident.endedAt = incident.restoredAt
    const ttr = (now - Date.parse(incident.detectedAt)) / 1000
    incident.timeToRestoreSeconds = round(ttr)
    let i = 0
    while (i < TTR_BUCKETS.length && ttr > (TTR_BUCKETS[i] as number)) i++
    this.ttrBuckets[i]++
    this.ttrSum += ttr
    this.ttrCount++
    this.deps.logger.warn({ event: 'incident', incident: incident.id, phase: 'restored', timeToRestoreSeconds: incident.timeToRestoreSeconds, checks: incident.checks }, 'restoration verified')
    this.notify(incident, 'restoration_verified', `service restored (verified) ${incident.timeToRestoreSeconds} s after detection, ${restoredBy(incident)}`)
    this.deps.persist({ action: 'incident.restored', targets: [incident.id], reason: 'restoration verified', result: 'restored', requester: 'breakwater', trigger: incident.trigger, timeToRestoreSeconds: incident.timeToRestoreSeconds })
    this.deps.progressed?.(incident, { restoredAt: incident.restoredAt })
  }

  /** `noRealTraffic`: nothing showed that users are served again, but nothing showed they are not. */
  private notRestored (run: Running, noRealTraffic: boolean): void {
    const { incident } = run
    this.count(incident)
    this.running.delete(incident.id)
    incident.endedAt = new Date().toISOString()
    const seconds = this.deps.config().verification.timeoutMs / 1000
    const what = cleared(incident) ? 'the signal clearing' : `${incident.mitigation?.action ?? 'the mitigation'} ${incident.mitigation?.id ?? ''}`
    incident.status = noRealTraffic ? 'unverified' : 'not_restored'
    // `monitoring` is while verifying (SPEC §19): verification is over and did not show service back.
    this.deps.notifier.pageReopened({ service: this.deps.config().service, version: incident.version, trigger: incident.trigger, summary: noRealTraffic ? 'restoration could not be confirmed yet; we are still investigating' : 'the fix applied has not restored service; we are still working on it' })
    if (noRealTraffic) {
      this.deps.logger.error({ event: 'incident', incident: incident.id, phase: 'unverified', checks: incident.checks }, 'restoration not verified: no real traffic since the mitigation')
      this.notify(incident, 'restoration_failed', `NOT verified: no real traffic within ${seconds} s after ${what} (synthetic checks alone do not restore an incident)`)
      // Nobody knows whether users are served: the escalation deadline stands.
      this.deps.persist({ action: 'incident.unverified', targets: [incident.id], reason: `no real traffic within ${seconds} s after ${what}`, result: 'unverified', requester: 'breakwater', trigger: incident.trigger })
      this.awaitTraffic(incident)
      return
    }
    this.deps.logger.error({ event: 'incident', incident: incident.id, phase: 'not_restored', checks: incident.checks }, 'the mitigation did not restore service')
    this.notify(incident, 'restoration_failed', `NOT restored: ${what} did not bring service back within ${seconds} s`)
    this.deps.persist({ action: 'incident.not_restored', targets: [incident.id], reason: `${what} did not bring service back within ${seconds} s`, result: 'not_restored', requester: 'breakwater', trigger: incident.trigger })
    this.escalate(incident, 'the mitigation did not restore service (verification failed)')
  }

  /**
   * Whether `incident`, ended `unverified`, still waits for real traffic to be judged by: this
   * sidecar acts for it, and no newer incident of its trigger and version (the same incident key:
   * the same page, status page incident and escalation alert) carries the outage on.
   */
  private awaitsTraffic (incident: Incident): boolean {
    if (incident.status !== 'unverified' || incident.fleet?.role === 'follower') return false
    const newest = this.incidents.find((i) => i.trigger === incident.trigger && i.version === incident.version)
    return newest === incident
  }

  /**
   * An incident that ended `unverified` is not over: nothing showed service back, nothing showed
   * it down, and its page, escalation and status page incident are still open. Left alone they
   * would stay so for good — an alert that never resolves is one on-call learns to ignore. It is
   * watched every `intervalMs` until real traffic returns to its scope (as much as verification
   * needs within `windowMs`), and then verified on that traffic as after a mitigation: restored,
   * it is resolved everywhere it was announced; not, it ends `not_restored` and is escalated.
   */
  private awaitTraffic (incident: Incident): void {
    if (this.stopped || this.awaiting.has(incident.id)) return
    const timer = setInterval(() => { this.trafficReturned(incident) }, this.deps.config().verification.intervalMs)
    timer.unref()
    this.awaiting.set(incident.id, timer)
  }

  private stopAwaiting (id: string): void {
    const timer = this.awaiting.get(id)
    if (timer !== undefined) clearInterval(timer)
    this.awaiting.delete(id)
  }

  /** One look of `awaitTraffic`: enough real traffic in scope since verification ended starts verifying it. */
  private trafficReturned (incident: Incident): void {
    if (this.stopped || !this.incidents.includes(incident) || !this.awaitsTraffic(incident)) {
      this.stopAwaiting(incident.id)
      return
    }
    const now = Date.now()
    const trigger = incident.trigger === null ? null : this.deps.config().rollbackTriggers.find((t) => t.name === incident.trigger) ?? null
    // Judged from when verification ended: the traffic seen returning counts.
    const since = incident.endedAt !== null ? Date.parse(incident.endedAt) : now
    const windowNow = windowNowMs()
    const look: Running = { incident, trigger, since: windowMsOf(since), timer: null, deadline: windowNow, busy: false }
    if (this.readTraffic(look, this.routesToJudge(incident), windowNow).ok === null) return
    this.stopAwaiting(incident.id)
    incident.endedAt = null
    this.startVerifying(incident, trigger, since, now + this.deps.config().verification.timeoutMs)
    this.deps.logger.warn({ event: 'incident', incident: incident.id, phase: 'traffic_returned', trigger: incident.trigger }, 'real traffic returned to an incident that ended unverified; verifying restoration on it')
    const cfg = this.deps.config()
    // An operator's incident is not on the status page; pageStatus leaves it off.
    this.deps.notifier.pageStatus({ service: cfg.service, version: incident.version, trigger: incident.trigger, summary: 'real traffic returned; verifying that service is restored' }, 'monitoring')
    this.deps.persist({ action: 'incident.verifying', targets: [incident.id], reason: 'real traffic returned after verification ended unverified', result: 'verifying', requester: 'breakwater', trigger: incident.trigger })
    this.countOpen()
  }

  private notify (incident: Incident, kind: IncidentEventKind, summary: string): void {
    const event = this.event(incident, kind, summary)
    if (kind === 'restoration_verified') {
      const superseded = this.supersededEscalations(incident)
      // Their escalation went out under this incident's key (the same PagerDuty dedup_key): this
      // restoration resolves it, or the page to the escalation routing key would stay open for good.
      if (superseded.length > 0) event.details.supersededEscalated = superseded
    }
    this.deps.notifier.notify(event)
  }

  /**
   * The older incidents of `incident`'s key (its trigger and version) that this sidecar acted
   * for, that were escalated and never restored: they ended (not restored, unverified) and this
   * newer incident carried their outage on, so nothing else will resolve their escalation.
   */
  private supersededEscalations (incident: Incident): string[] {
    return this.incidents
      .filter((i) => i !== incident && i.trigger === incident.trigger && i.version === incident.version && i.escalatedAt !== null && i.status !== 'restored' && !OPEN.has(i.status) && i.fleet?.role !== 'follower' && Date.parse(i.detectedAt) <= Date.parse(incident.detectedAt))
      .map((i) => i.id)
  }

  private event (incident: Incident, kind: IncidentEventKind, summary: string): NotificationEvent {
    const cfg = this.deps.config()
    return {
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
        syntheticRounds: incident.checks.syntheticRounds,
        status: incident.status,
        escalated: incident.escalatedAt !== null,
        escalateAt: incident.escalateAt
      },
      // An escalation is dated when it happened, also when it is posted again after a restart.
      time: kind === 'escalated' && incident.escalatedAt !== null ? incident.escalatedAt : new Date().toISOString(),
      incident: incident.fleet?.incident ?? incident.id
    }
  }

  stop (): void {
    this.stopped = true
    for (const r of this.running.values()) if (r.timer !== null) clearTimeout(r.timer)
    this.running.clear()
    this.escalations.stop()
    for (const timer of this.awaiting.values()) clearInterval(timer)
    this.awaiting.clear()
    if (this.counter !== null) clearInterval(this.counter)
    this.counter = null
  }
}

/** The one line of an escalation: the incident, why, where it stands and what acted. */
function escalationSummary (incident: Incident, why: string): string {
  return `ESCALATED: incident ${incident.id} ${why} (${incident.status.replace('_', ' ')}${incident.mitigation !== null ? `; ${incident.mitigation.action} ${incident.mitigation.id}` : '; no mitigation yet'})`
}

/** Whether `incident` is verified from its signal clearing, with no mitigation in force. */
function cleared (incident: Incident): boolean {
  return incident.clearedAt !== undefined
}

/** How the signal of `incident` cleared, verified from then: with no mitigation, after a failed one, or after one that did not restore service. */
function clearedWhy (incident: Incident): string {
  const m = incident.mitigation
  if (m === null) return 'with no mitigation applied'
  if (m.status === 'failed') return `after the ${m.action} ${m.id} failed`
  return `after the ${m.action} ${m.id} had not restored service`
}

/** What restored `incident`, for the restoration notice. */
function restoredBy (incident: Incident): string {
  if (cleared(incident)) {
    const m = incident.mitigation
    // An operator's incident has no signal of its own: it was judged on real traffic.
    if (incident.trigger === null) return `on real traffic, with no mitigation in force${m !== null ? ` (the ${m.action} ${m.id} failed)` : ''}`
    if (m === null) return 'with no mitigation: the signal cleared'
    if (m.status === 'failed') return `with no mitigation in force (the ${m.action} ${m.id} failed): the signal cleared`
    return `once the signal cleared (the ${m.action} ${m.id} had not restored service)`
  }
  return `by ${incident.mitigation?.action ?? 'mitigation'} ${incident.mitigation?.id ?? ''}`
}

function round (x: number): number {
  return Math.round(x * 1000) / 1000
}
