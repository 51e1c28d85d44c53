/**
 * The status page lifecycle of an incident (SPEC §19) on the Statuspage API: the page incident
 * is created once (`POST /v1/pages/{page_id}/incidents`) and then updated by the id the page
 * answered with (`PATCH /v1/pages/{page_id}/incidents/{incident_id}`), its `status` moving
 * investigating → identified → monitoring → resolved, never backwards and never twice.
 *
 * - One page incident per incident key (service, version, trigger: the same on every sidecar of
 *   the fleet), so the key's id is what every later update uses.
 * - Updates of one page incident go one at a time, in order: `identified` is never sent before
 *   the create that gives its id has been answered.
 * - The id is persisted (`onChange`, kept in `stateDir`), so a sidecar restarted mid-incident
 *   updates the same page incident instead of creating a second one.
 * - In a fleet only the incident's actor sends (SPEC §16); it writes the id and the last status
 *   on the incident key in etcd, and the others `adopt` them, so a sidecar that takes over from
 *   a leader that left updates the leader's page incident instead of creating a second one.
 * - An id we do not have is never guessed: an update without one creates the page incident (the
 *   outage is still going on, customers should hear of it), but a `resolved` without one is not
 *   sent — creating an incident only to resolve it could duplicate one whose creation did
 *   happen but whose answer was lost. It is logged (`statuspage_unknown_incident`) and counted as
 *   a failed status page notification, for a human to close the page incident by hand.
 */
import type { Logger } from 'pino'
import type { NotificationsConfig } from '../config/types.js'

export type PageStatus = 'investigating' | 'identified' | 'monitoring' | 'resolved'

const RANK: Record<PageStatus, number> = { investigating: 0, identified: 1, monitoring: 2, resolved: 3 }

/** What is persisted per incident key. */
export interface PageIncidentState {
  id: string | null
  status: string
}

/** One request to the page's API; `settled` is called once, with the parsed answer when it succeeded. */
export interface PageRequest {
  method: 'POST' | 'PATCH'
  url: string
  headers: Record<string, string>
  body: unknown
}
export type SendPageRequest = (req: PageRequest, settled: (ok: boolean, answer: unknown) => void) => void

interface Update {
  status: PageStatus
  name: string
  text: string
  /** Kept with the page incident (Statuspage `metadata`), e.g. the trigger and version. */
  metadata: Record<string, unknown>
}

interface PageIncident {
  id: string | null
  /** The last status the page accepted (null: not created yet). */
  status: PageStatus | null
  queue: Update[]
  busy: boolean
}

/** Resolved page incidents kept (to refuse stale updates) before the oldest are forgotten. */
const KEEP_RESOLVED = 100

export class StatusPageLifecycle {
  private readonly incidents = new Map<string, PageIncident>()
  /** Told whenever a page incident's id or status changes (persist it). */
  onChange: (key: string, state: PageIncidentState | null) => void = () => {}
  /** Called for an update that could not be sent (counted as a failed notification). */
  onUnsent: () => void = () => {}

  constructor (private readonly config: () => NotificationsConfig, private readonly send: SendPageRequest, private readonly logger: Logger) {}

  /** Page incidents persisted by an earlier run. */
  restore (saved: Readonly<Record<string, PageIncidentState>>): void {
    for (const [key, s] of Object.entries(saved)) {
      const status = s.status in RANK ? s.status as PageStatus : null
      this.incidents.set(key, { id: s.id, status, queue: [], busy: false })
    }
  }

  /**
   * The page incident of `key` as the fleet's actor for it reports it (SPEC §16): this sidecar
   * updates that one from now on. Ignored while this sidecar is sending for `key` itself, or
   * when it already knows that page incident at that status or past it.
   */
  adopt (key: string, state: { id: string, status: string }): void {
    const status = state.status in RANK ? state.status as PageStatus : null
    const p = this.incidents.get(key)
    if (state.id === '' || status === null || p?.busy === true || (p?.queue.length ?? 0) > 0) return
    if (p !== undefined && p.id === state.id && p.status !== null && RANK[p.status] >= RANK[status]) return
    this.incidents.set(key, { id: state.id, status, queue: [], busy: false })
    this.onChange(key, { id: state.id, status })
  }

  /** The page incident of `key` as known now (tests, state view). */
  get (key: string): PageIncidentState | null {
    const p = this.incidents.get(key)
    return p === undefined ? null : { id: p.id, status: p.status ?? 'unsent' }
  }

  /** Move the page incident of `key` to `status` (ignored when it is already there or past it). */
  advance (key: string, status: PageStatus, name: string, text: string, metadata: Record<string, unknown> = {}): void {
    let p = this.incidents.get(key)
    // A resolved page incident is over: the same key firing again is a new outage, a new page incident.
    if (p !== undefined && p.status === 'resolved' && p.queue.length === 0 && status === 'investigating') {
      this.incidents.delete(key)
      p = undefined
    }
    if (p === undefined) {
      p = { id: null, status: null, queue: [], busy: false }
      this.incidents.set(key, p)
      this.forgetOldResolved()
    }
    const last = p.queue.at(-1)?.status ?? p.status
    if (last !== null && RANK[status] <= RANK[last]) return
    p.queue.push({ status, name, text, metadata })
    this.pump(key, p)
  }

  private pump (key: string, p: PageIncident): void {
    if (p.busy) return
    const next = p.queue.shift()
    if (next === undefined) return
    const c = this.config()
    if (c.statusPageId === null || c.statusPageApiKey === null) { p.queue.length = 0; return }
    const base = `${c.statusPageUrl}/v1/pages/${encodeURIComponent(c.statusPageId)}/incidents`
    const headers = { authorization: `OAuth ${c.statusPageApiKey}`, 'idempotency-key': `${key}-${next.status}` }
    const metadata = { breakwater: { incident_key: key, ...next.metadata } }
    // Created but its id unknown (the page answered without one), or a resolve of one never created.
    if (p.id === null && (p.status !== null || next.status === 'resolved')) {
      this.logger.error({ event: 'statuspage_unknown_incident', incidentKey: key, status: next.status }, 'status page incident id unknown; not updating it by guess — update it by hand if it exists')
      this.onUnsent()
      this.pump(key, p)
      return
    }
    p.busy = true
    const settled = (ok: boolean, answer: unknown): void => {
      p.busy = false
      if (ok) {
        if (p.id === null) {
          const id = (answer as { id?: unknown } | null)?.id
          if (typeof id === 'string' && id !== '') p.id = id
          else this.logger.error({ event: 'statuspage_unknown_incident', incidentKey: key }, 'the status page answered a create without an incident id')
        }
        p.status = next.status
        this.onChange(key, { id: p.id, status: p.status })
      }
      this.pump(key, p)
    }
    if (p.id === null) {
      // Statuspage: incident[name], incident[status], incident[body], incident[impact_override].
      this.send({ method: 'POST', url: base, headers, body: { incident: { name: next.name, status: next.status, body: next.text, impact_override: 'major', metadata } } }, settled)
    } else {
      this.send({ method: 'PATCH', url: `${base}/${encodeURIComponent(p.id)}`, headers, body: { incident: { status: next.status, body: next.text, metadata } } }, settled)
    }
  }

  private forgetOldResolved (): void {
    if (this.incidents.size <= KEEP_RESOLVED) return
    for (const [key, p] of this.incidents) {
      if (this.incidents.size <= KEEP_RESOLVED) break
      if (p.status === 'resolved' && !p.busy && p.queue.length === 0) {
        this.incidents.delete(key)
        this.onChange(key, null)
      }
    }
  }
}
