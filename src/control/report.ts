/**
 * The post-mortem draft of an incident (SPEC §19): `GET /v1/incidents/:id/report` and
 * `breakwater incident report ID`. Built only from what the sidecar holds — the incident record
 * (phases, the trigger's reading, the triage at detection, the impact counted from the windows
 * while it was open; all in `stateDir`) and the audit log — so it is the same after a restart.
 *
 * No invented numbers: a figure the sidecar does not hold is left out, and the draft says which
 * and why (`notHeld`). Blameless: it says what happened and what acted, and asks what the system
 * allowed, never who is at fault.
 */
import type { AuditEntry } from '../state/audit-log.js'
import { PEAK_MIN_REQUESTS } from './impact.js'
import type { Incident } from './verify.js'

export interface ReportEvent {
  time: string
  what: string
  /** `operator <address>`, `trigger <name>` or `breakwater`. */
  by: string
  reason: string | null
  /**
   * A rollback's idempotency key (the webhook's `Idempotency-Key`, a git revert's
   * `Breakwater-Incident` trailer, an exec's `BREAKWATER_IDEMPOTENCY_KEY`): on its start and
   * its result. Absent on other events.
   */
  idempotencyKey?: string
  /** A git rollback's revert commit on the branch, and the commit it reverts (its result). */
  commit?: string
  reverted?: string
}

export interface IncidentReport {
  incident: string
  service: string
  version: string
  trigger: string | null
  status: Incident['status']
  generatedAt: string
  summary: string
  impact: {
    routes: string[]
    requests: number
    requestsFailed: number
    peakErrorRate: number | null
    peakAt: string | null
    /** From the first failure held (or detection) to verified restoration; null when not restored. */
    durationSeconds: number | null
    countedFrom: string
    countedTo: string
    probesExcluded: number
    gaps: Incident['impact']['gaps']
  }
  times: {
    firstFailureAt: string | null
    detectedAt: string
    mitigatedAt: string | null
    restoredAt: string | null
    escalatedAt: string | null
    timeToDetectSeconds: number | null
    timeToMitigateSeconds: number | null
    timeToRestoreSeconds: number | null
  }
  detection: Incident['detection']
  timeline: ReportEvent[]
  actors: Array<{ by: string, kind: 'operator' | 'trigger' | 'breakwater', actions: string[], reasons: string[] }>
  triage: Incident['triage']
  openQuestions: string[]
  /** Figures left out because the sidecar does not hold them, each with why. */
  notHeld: string[]
}

/** Audit actions that belong to an incident's timeline when they happen during it. */
const ACTING = /^(mitigation\.|flag\.|circuit\.|config\.reload|trigger\.)/

/**
 * Build the draft of `incident` from its record and `audit` (newest first, as read;
 * `auditComplete`: false when that is not the whole log, and if it then does not reach back to
 * the incident, the draft says so). `routes`: the routes of its scope.
 */
export function buildReport (incident: Incident, service: string, routes: string[], audit: readonly AuditEntry[], auditComplete: boolean, now: number): IncidentReport {
  const notHeld: string[] = []
  const detectedAt = Date.parse(incident.detectedAt)
  const end = incident.restoredAt ?? incident.endedAt ?? new Date(now).toISOString()
  const from = Math.min(detectedAt, incident.detection?.firstFailureAt !== null && incident.detection?.firstFailureAt !== undefined ? Date.parse(incident.detection.firstFailureAt) : detectedAt) - 1000
  const to = Date.parse(end) + 1000
  const oldest = audit.at(-1)
  if (!auditComplete && (oldest === undefined || Date.parse(oldest.time) > from)) notHeld.push('audit lines from before the oldest one kept (the audit log rotated, or was not writable): the timeline may miss actions')
  // Oldest first, so that lines of the same millisecond keep the order they were written in.
  const mine = [...audit].reverse()
    .filter((e) => {
      if (e.targets.includes(incident.id)) return true
      if (incident.mitigation !== null && e.id === incident.mitigation.id) return true
      const t = Date.parse(e.time)
      return ACTING.test(e.action) && t >= from && t <= to
    })
    .sort((a, b) => Date.parse(a.time) - Date.parse(b.time))
  const timeline: ReportEvent[] = []
  const d = incident.detection
  if (d?.firstFailureAt != null) timeline.push({ time: d.firstFailureAt, what: 'first failed request in scope held by the trigger window', by: 'breakwater', reason: null })
  for (const e of mine) timeline.push({ time: e.time, what: describe(e), by: who(e.requester), reason: e.reason, ...rollbackFacts(e) })
  if (!mine.some((e) => e.action === 'incident.detected')) timeline.push({ time: incident.detectedAt, what: 'incident detected', by: incident.trigger !== null ? `trigger ${incident.trigger}` : 'operator', reason: null })
  timeline.sort((a, b) => Date.parse(a.time) - Date.parse(b.time))

  const actors = new Map<string, IncidentReport['actors'][number]>()
  for (const e of mine) {
    if (e.action.startsWith('incident.')) continue
    const by = who(e.requester)
    const a = actors.get(by) ?? { by, kind: by.startsWith('trigger ') ? 'trigger' : by === 'breakwater' ? 'breakwater' : 'operator', actions: [], reasons: [] }
    a.actions.push(`${e.action} ${e.targets.join(', ')} (${e.result})`)
    if (!a.reasons.includes(e.reason)) a.reasons.push(e.reason)
    actors.set(by, a)
  }

  const firstFailureAt = d?.firstFailureAt ?? null
  const timeToDetect = firstFailureAt === null ? null : seconds(detectedAt - Date.parse(firstFailureAt))
  if (d === null) notHeld.push('time to detect: an operator declared this incident by mitigating; no trigger reading says when it started')
  else if (firstFailureAt === null) notHeld.push('time to detect: no failed request in scope was held at second resolution within the trigger window (the windows keep about two minutes per second)')
  if (incident.mitigatedAt === null) notHeld.push('time to mitigate: no mitigation was applied')
  if (incident.restoredAt === null) notHeld.push(`time to restore and duration: service was not verified restored (status ${incident.status.replace('_', ' ')})`)
  const durationSeconds = incident.restoredAt === null ? null : seconds(Date.parse(incident.restoredAt) - Date.parse(firstFailureAt ?? incident.detectedAt))
  const impact = incident.impact
  if (impact.peakErrorRate === null) notHeld.push(`peak error rate: no whole second with at least ${PEAK_MIN_REQUESTS} requests in scope`)
  for (const g of impact.gaps) notHeld.push(`traffic from ${g.from} to ${g.to}: ${g.why}`)
  notHeld.push('requests refused by a mitigation (kill switch, forced circuit) are not counted as failed: the trigger windows do not record them')
  notHeld.push('latency during the incident is not kept per incident (only the trigger reading, when its metric is p99_latency)')
  if (incident.status === 'detected' || incident.status === 'verifying') notHeld.push(`the incident is still ${incident.status}: the figures run up to ${impact.to}`)

  const report: IncidentReport = {
    incident: incident.id,
    service,
    version: incident.version,
    trigger: incident.trigger,
    status: incident.status,
    generatedAt: new Date(now).toISOString(),
    summary: summary(incident, service),
    impact: {
      routes,
      requests: impact.requests,
      requestsFailed: impact.failed,
      peakErrorRate: impact.peakErrorRate,
      peakAt: impact.peakAt,
      durationSeconds,
      countedFrom: impact.from,
      countedTo: impact.to,
      probesExcluded: impact.probesExcluded,
      gaps: impact.gaps
    },
    times: {
      firstFailureAt,
      detectedAt: incident.detectedAt,
      mitigatedAt: incident.mitigatedAt,
      restoredAt: incident.restoredAt,
      escalatedAt: incident.escalatedAt,
      timeToDetectSeconds: timeToDetect,
      timeToMitigateSeconds: incident.timeToMitigateSeconds,
      timeToRestoreSeconds: incident.timeToRestoreSeconds
    },
    detection: d,
    timeline,
    actors: [...actors.values()],
    triage: incident.triage,
    openQuestions: [],
    notHeld
  }
  report.openQuestions = questions(incident, report)
  return report
}

function summary (i: Incident, service: string): string {
  const how = i.trigger !== null ? `trigger ${i.trigger} fired` : 'an operator mitigated'
  const what = i.mitigation !== null ? `${i.mitigation.action} ${i.mitigation.id}` : 'no mitigation'
  const outcome = i.status === 'restored'
    ? `service was verified restored ${String(i.timeToRestoreSeconds)} s after detection`
    : i.status === 'not_restored' ? 'the mitigation did not restore service' : i.status === 'unverified' ? 'restoration could not be verified (no real traffic)' : `the incident is still ${i.status}`
  return `${service} ${i.version}: ${how} at ${i.detectedAt}; ${what}; ${outcome}${i.escalatedAt !== null ? `; escalated at ${i.escalatedAt}` : ''}.`
}

/** Questions for the blameless review, from what happened (never about a person). */
function questions (i: Incident, r: IncidentReport): string[] {
  const q: string[] = []
  const scenario = i.triage?.scenario
  if (scenario === 'bad_deployment') q.push(`What in version ${i.version} caused the failures, and what would have caught it before it reached production traffic?`)
  else if (scenario === 'feature_regression') q.push('What in the feature behind the kill switch failed, and could it have been released to fewer users first?')
  else if (scenario === 'downstream_failure') q.push('What happened to the failing dependency, and did timeouts and circuit settings bound the damage as intended?')
  else q.push('What changed shortly before the first failure? Triage found no clear scenario at detection.')
  if (r.times.timeToDetectSeconds !== null && i.detection !== null) q.push(`Detection came ${r.times.timeToDetectSeconds} s after the first failure held, with a ${i.detection.windowSeconds} s window at threshold ${i.detection.threshold}: is that trigger right for this service?`)
  if (i.mitigatedAt === null) q.push('Nothing was mitigated: was a runbook, a kill switch or a trigger action missing?')
  else if (i.status === 'not_restored') q.push('Why did the mitigation not restore service, and which rung of the ladder (kill switch > rollback > failover > circuit break > scale) should have come next?')
  else if (i.status === 'unverified') q.push('No real traffic reached the mitigated routes: how should restoration be verified for this service?')
  if (i.mitigation?.status === 'failed') q.push('The rollback action failed: what would make it succeed the next time it is needed?')
  if (i.escalatedAt !== null) q.push(`The incident was escalated at ${i.escalatedAt}: did the page reach someone able to act, and how soon did they?`)
  if (i.impact.gaps.length > 0) q.push('The sidecar restarted during the incident: why, and did the restart change what users saw?')
  if (i.mitigation?.action === 'killSwitch') q.push('Users of the switched-off feature were refused while it was off: how many, and what did they see?')
  return q
}

function who (requester: string): string {
  if (requester.startsWith('trigger:')) return `trigger ${requester.slice(8)}`
  if (requester === 'breakwater') return 'breakwater'
  return `operator ${requester}`
}

/** The idempotency key and revert commit an audited rollback line carries, as strings. */
function rollbackFacts (e: AuditEntry): Pick<ReportEvent, 'idempotencyKey' | 'commit' | 'reverted'> {
  if (e.action !== 'mitigation.rollback' && e.action !== 'mitigation.rollback.result') return {}
  const out: Pick<ReportEvent, 'idempotencyKey' | 'commit' | 'reverted'> = {}
  if (typeof e.idempotencyKey === 'string' && e.idempotencyKey !== '') out.idempotencyKey = e.idempotencyKey
  if (typeof e.commit === 'string') out.commit = e.commit
  if (typeof e.reverted === 'string') out.reverted = e.reverted
  return out
}

function describe (e: AuditEntry): string {
  const targets = e.targets.join(', ')
  const facts = rollbackFacts(e)
  switch (e.action) {
    case 'mitigation.rollback': {
      const type = typeof e.rollbackType === 'string' ? ` (${e.rollbackType})` : ''
      return `rollback of ${targets} started${type}${facts.idempotencyKey !== undefined ? `, idempotency key ${facts.idempotencyKey}` : ''}`
    }
    case 'mitigation.rollback.result': {
      const parts = [`rollback of ${targets} → ${e.result}`]
      if (facts.commit !== undefined) {
        parts.push(`revert commit ${facts.commit}${e.alreadyReverted === true ? ' (already on the branch: another sidecar pushed it)' : facts.reverted !== undefined ? ` reverts ${facts.reverted}` : ''}`)
      }
      if (facts.idempotencyKey !== undefined) parts.push(`idempotency key ${facts.idempotencyKey}`)
      return parts.join('; ')
    }
    case 'incident.detected': return 'incident detected'
    case 'incident.cleared': return 'the trigger re-armed with no mitigation in force; verifying restoration'
    case 'incident.restored': return 'restoration verified (synthetic checks and real traffic)'
    case 'incident.not_restored': return 'verification failed: service not restored'
    case 'incident.unverified': return 'verification ended unverified: no real traffic'
    case 'incident.verifying': return 'real traffic returned; verifying restoration on it'
    case 'incident.escalated': return 'incident escalated (critical)'
    default: return `${e.action} ${targets} → ${e.result}`
  }
}

function seconds (ms: number): number {
  return Math.round(ms) / 1000
}

/** The draft as Markdown. */
export function renderReport (r: IncidentReport): string {
  const pct = (x: number | null): string => x === null ? 'not held' : `${(x * 100).toFixed(1)}%`
  const secs = (x: number | null): string => x === null ? 'not held (see below)' : `${x} s`
  const cell = (x: string): string => x.replace(/\|/g, '\\|').replace(/\n/g, ' ')
  const out: string[] = []
  out.push(`# Post-mortem draft: ${r.service} incident ${r.incident}`, '')
  out.push(`_Draft generated by Breakwater at ${r.generatedAt} from the incident record, the audit log and the traffic windows. Blameless: it describes what happened and what acted, not who is at fault. Edit before sharing._`, '')
  out.push('## Summary', '', r.summary, '')
  out.push('## Impact', '')
  out.push(`- Requests failed: ${r.impact.requestsFailed} of ${r.impact.requests} on route(s) ${r.impact.routes.join(', ') || '(none)'} (counted ${r.impact.countedFrom} – ${r.impact.countedTo}; ${r.impact.probesExcluded} verification probes excluded)`)
  out.push(`- Peak error rate: ${pct(r.impact.peakErrorRate)}${r.impact.peakAt !== null ? ` (the second at ${r.impact.peakAt})` : ''}`)
  out.push(`- Duration: ${r.impact.durationSeconds === null ? 'not held (see below)' : `${r.impact.durationSeconds} s, from the ${r.times.firstFailureAt !== null ? 'first failure held' : 'detection'} to verified restoration`}`)
  if (r.detection !== null) out.push(`- Detection reading: ${r.detection.metric} ${r.detection.value} over ${r.detection.windowSeconds} s (threshold ${r.detection.threshold}; ${r.detection.errors} of ${r.detection.requests} requests failed)`)
  out.push('')
  out.push('## Timeline (UTC)', '', '| time | event | by | reason |', '|---|---|---|---|')
  for (const e of r.timeline) out.push(`| ${e.time} | ${cell(e.what)} | ${cell(e.by)} | ${cell(e.reason ?? '')} |`)
  out.push('')
  out.push('## Who or what acted', '')
  if (r.actors.length === 0) out.push('- Nothing acted on the service during the incident.')
  for (const a of r.actors) out.push(`- \`${a.by}\` (${a.kind}) on version ${r.version}: ${a.actions.join('; ')} — reason: ${a.reasons.join(' / ')}`)
  out.push('')
  out.push('## Times', '')
  out.push(`- Time to detect (first failure held → detection): ${secs(r.times.timeToDetectSeconds)}`)
  out.push(`- Time to mitigate (detection → mitigation): ${secs(r.times.timeToMitigateSeconds)}`)
  out.push(`- Time to restore (detection → verified restoration): ${secs(r.times.timeToRestoreSeconds)}`)
  if (r.times.escalatedAt !== null) out.push(`- Escalated at: ${r.times.escalatedAt}`)
  out.push('')
  out.push('## What triage ruled out', '')
  if (r.triage === null) out.push('- No triage was kept for this incident.')
  else {
    out.push(`At detection triage chose **${r.triage.scenario.replace(/_/g, ' ')}** (recommended: ${r.triage.recommendation}): ${r.triage.summary}`, '')
    for (const x of r.triage.ruledOut) out.push(`- ${x.scenario.replace(/_/g, ' ')}: ${x.why}`)
  }
  out.push('')
  out.push('## Open questions for the review', '')
  for (const q of r.openQuestions) out.push(`- ${q}`)
  out.push('')
  out.push('## Not held by the sidecar', '', 'These figures are left out rather than estimated:', '')
  for (const n of r.notHeld) out.push(`- ${n}`)
  return out.join('\n') + '\n'
}
