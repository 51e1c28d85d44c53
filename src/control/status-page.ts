/**
 * The status page lifecycle of an incident (SPEC §19) on the Statuspage API: the page incident
 * is created once (`POST /v1/pages/{page_id}/incidents`) and then updated by the id the page
 * answered with (`PATCH /v1/pages/{page_id}/incidents/{incident_id}`), its `status` moving
 * investigating → identified → monitoring → resolved, never backwards and never twice — with
 * one exception (`reopen`): `monitoring` says "a fix is in, we are watching it", so when the
 * verification it announced fails (not restored, or no real traffic to tell) the page goes back
 * to `identified`. That starts a new round: the next `monitoring` and the `resolved` go on from
 * there, and each update of a round has its own idempotency key (each naming its page incident:
 * a later outage of the same key, after the first page incident was resolved, is not its repeat).
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
 * - A create that may have reached the page without its id reaching us (its answer failed or
 *   never came: a timeout, a 5xx, a restart while it was in flight, a fleet leader gone while it
 *   was in flight) is looked for on the page before anything else is sent for that incident:
 *   `GET /v1/pages/{page_id}/incidents/unresolved`, by `metadata.breakwater.incident_key`. Found,
 *   it is updated by its id; not found, it is created. The look-up is one request, not a
 *   notification (not counted); when it fails the create goes ahead — the outage is still on and
 *   customers should hear of it. Creates are retried here (not by the notifier), so that every
 *   retry looks first.
 * - An id we do not have is never guessed: a `resolved` for a page incident that was never seen
 *   (not answered, not found) is not sent — creating an incident only to resolve it would tell
 *   customers nothing. It is logged (`statuspage_unknown_incident`) and counted as a failed
 *   status page notification, for a human to close the page incident by hand if it exists.
 */
import type { Logger } from 'pino'
import type { NotificationsConfig } from '../config/types.js'
import { retryDelayMs } from './retry-after.js'

export type PageStatus = 'investigating' | 'identified' | 'monitoring' | 'resolved'

const RANK: Record<PageStatus, number> = { investigating: 0, identified: 1, monitoring: 2, resolved: 3 }

/**
 * How far along a page incident is: its round (the times a failed verification sent it back to
 * `identified`), then its status in the round; `resolved` ends every round. -1: not a status.
 */
function position (status: string, round = 0): number {
  if (status === 'resolved') return Number.MAX_SAFE_INTEGER
  const rank = RANK[status as PageStatus]
  return rank === undefined ? -1 : round * 3 + rank
}

/**
 * Of two records of one page incident, the one further along (statuses never go backwards):
 * `known` when it names the same page incident further along, else `recorded`.
 */
export function furtherPage (recorded: { id: string, status: string, round?: number }, known: PageIncidentState | null): { id: string, status: string, round?: number } {
  if (known === null || known.id !== recorded.id) return recorded
  return position(known.status, known.round) > position(recorded.status, recorded.round) ? withRound(recorded.id, known.status, known.round ?? 0) : recorded
}

/** What is persisted per incident key (`round` only once a failed verification sent it back). */
export interface PageIncidentState {
  id: string | null
  status: string
  round?: number
  /**
   * While a later outage's create is in flight (`creating`): the resolved page incident it
   * follows, so that after a restart the create is sent again under the same Idempotency-Key.
   */
  after?: string
}

function withRound<T extends string | null> (id: T, status: string, round: number): { id: T, status: string, round?: number } {
  return round > 0 ? { id, status, round } : { id, status }
}

/**
 * One request to the page's API; `settled` is called once, with the parsed answer when it
 * succeeded. `once`: one attempt, retried (or not) by the caller.
 */
export interface PageRequest {
  method: 'POST' | 'PATCH' | 'GET'
  url: string
  headers: Record<string, string>
  body: unknown
  once?: boolean
  /** A read (the look-up), not a notification: not counted as one. */
  lookup?: boolean
}
export type SendPageRequest = (req: PageRequest, settled: (ok: boolean, answer: unknown, retryable?: boolean, retryAfterMs?: number | null) => void) => void

interface Update {
  status: PageStatus
  /** The round it belongs to (see `reopen`). */
  round: number
  name: string
  text: string
  /** Kept with the page incident (Statuspage `metadata`), e.g. the trigger and version. */
  metadata: Record<string, unknown>
}

interface PageIncident {
  id: string | null
  /** The last status the page accepted (null: not created yet). */
  status: PageStatus | null
  /** The round of that status (see `reopen`). */
  round: number
  queue: Update[]
  busy: boolean
  /** A create may have reached the page without its id reaching us: look for it there first. */
  unsure: boolean
  /** Creates failed in a row (retried after a look at the page, up to `maxAttempts`). */
  failedCreates: number
  /** The resolved page incident of the same key this one follows (a later outage), for its create's idempotency key. */
  after?: string
  /** The update being sent now (its answer not in yet). */
  sending?: PageStatus
  /**
   * The key fired again while this page incident was on its way to `resolved` (the resolve
   * queued or not answered yet): a new outage, whose page incident is opened once the resolve
   * is settled — not dropped as "already past investigating".
   */
  refired?: Omit<Update, 'status' | 'round'>
}

/** Persisted for a page incident whose create was sent and not answered (yet). */
const CREATING = 'creating'

/** One incident of the page's list of unresolved incidents, as far as it is read here. */
interface ListedIncident { id?: unknown, status?: unknown, metadata?: { breakwater?: { incident_key?: unknown } } }

/** Resolved page incidents kept (to refuse stale updates) before the oldest are forgotten. */
const KEEP_RESOLVED = 100

export class StatusPageLifecycle {
  private readonly incidents = new Map<string, PageIncident>()
  /** Told whenever a page incident's id or status changes (persist it). */
  onChange: (key: string, state: PageIncidentState | null) => void = () => {}
  /** Called for an update that could not be sent (counted as a failed notification). */
  onUnsent: () => void = () => {}
  /** Creates waiting out a retry backoff (they count as pending notifications). */
  retrying = 0

  constructor (private readonly config: () => NotificationsConfig, private readonly send: SendPageRequest, private readonly logger: Logger) {}

  /** Page incidents persisted by an earlier run. */
  restore (saved: Readonly<Record<string, PageIncidentState>>): void {
    for (const [key, s] of Object.entries(saved)) {
      const status = s.status in RANK ? s.status as PageStatus : null
      // Stopped while a create was in flight, after it failed or was answered without an id: it may be on the page.
      const p: PageIncident = { ...fresh(), id: s.id, status, round: roundOf(s.round), unsure: s.id === null }
      if (s.id === null && typeof s.after === 'string') p.after = s.after
      this.incidents.set(key, p)
    }
  }

  /**
   * The incident of `key` is carried on from a fleet leader that left without writing a page
   * incident on the key: it may have created one whose answer it never had. Look for it first.
   */
  inherit (key: string): void {
    const c = this.config()
    if (c.statusPageId === null || c.statusPageApiKey === null) return
    const p = this.incidents.get(key)
    if (p === undefined) this.incidents.set(key, { ...fresh(), unsure: true })
    else if (p.id === null) p.unsure = true
  }

  /**
   * The page incident of `key` as the fleet's actor for it reports it (SPEC §16): this sidecar
   * updates that one from now on. Ignored while this sidecar is sending for `key` itself, or
   * when it already knows that page incident at that status or past it.
   */
  adopt (key: string, state: { id: string, status: string, round?: number }): void {
    const status = state.status in RANK ? state.status as PageStatus : null
    const round = roundOf(state.round)
    const p = this.incidents.get(key)
    if (state.id === '' || status === null || p?.busy === true || (p?.queue.length ?? 0) > 0) return
    if (p !== undefined && p.id === state.id && p.status !== null && position(p.status, p.round) >= position(status, round)) return
    this.incidents.set(key, { ...fresh(), id: state.id, status, round })
    this.onChange(key, withRound(state.id, status, round))
  }

  /** The page incident of `key` as known now (tests, state view). */
  get (key: string): PageIncidentState | null {
    const p = this.incidents.get(key)
    return p === undefined ? null : withRound(p.id, p.status ?? 'unsent', p.round)
  }

  /** Move the page incident of `key` to `status` (ignored when it is already there or past it). */
  advance (key: string, status: PageStatus, name: string, text: string, metadata: Record<string, unknown> = {}): void {
    let p = this.incidents.get(key)
    if (p !== undefined && status === 'investigating' && p.status !== 'resolved' && (p.queue.at(-1)?.status ?? p.sending) === 'resolved') {
      p.refired = { name, text, metadata }
      return
    }
    // A resolved page incident is over: the same key firing again is a new outage, a new page incident.
    let after: string | undefined
    if (p !== undefined && p.status === 'resolved' && p.queue.length === 0 && status === 'investigating') {
      this.incidents.delete(key)
      after = p.id ?? undefined
      p = undefined
    }
    if (p === undefined) {
      p = after !== undefined ? { ...fresh(), after } : fresh()
      this.incidents.set(key, p)
      this.forgetOldResolved()
    }
    const last = p.queue.at(-1) ?? (p.status === null ? null : { status: p.status, round: p.round })
    const round = last?.round ?? 0
    if (last !== null && position(status, round) <= position(last.status, last.round)) return
    p.queue.push({ status, round, name, text, metadata })
    this.pump(key, p)
  }

  /**
   * The verification `monitoring` announced has failed (SPEC §19: `monitoring` is while
   * verifying): the page incident of `key` goes back to `identified` — the cause is known, the
   * fix is not confirmed — in a new round, so that a later `monitoring` and `resolved` are sent.
   * Ignored unless `monitoring` is where it is (or is about to be).
   */
  reopen (key: string, name: string, text: string, metadata: Record<string, unknown> = {}): void {
    const p = this.incidents.get(key)
    if (p === undefined) return
    const last = p.queue.at(-1) ?? (p.status === null ? null : { status: p.status, round: p.round })
    if (last?.status !== 'monitoring') return
    p.queue.push({ status: 'identified', round: last.round + 1, name, text, metadata })
    this.pump(key, p)
  }

  private pump (key: string, p: PageIncident): void {
    if (p.busy) return
    const c = this.config()
    if (c.statusPageId === null || c.statusPageApiKey === null) { p.queue.length = 0; return }
    const base = `${c.statusPageUrl}/v1/pages/${encodeURIComponent(c.statusPageId)}/incidents`
    if (p.id === null && p.unsure && p.queue.length > 0) {
      this.lookUp(key, p, base, `OAuth ${c.statusPageApiKey}`)
      return
    }
    const next = p.queue.shift()
    if (next === undefined) {
      const refired = p.refired
      p.refired = undefined
      // The resolve was given up on: the page incident is still open, and the new outage is in it.
      if (refired !== undefined && p.status === 'resolved') this.advance(key, 'investigating', refired.name, refired.text, refired.metadata)
      return
    }
    // Found on the page at this status or past it already.
    if (p.status !== null && position(next.status, next.round) <= position(p.status, p.round)) {
      this.pump(key, p)
      return
    }
    // One key per page incident and status: an update names the page incident it goes to, and a
    // later outage's create the resolved one it follows — under the first one's keys, a page that
    // honours Idempotency-Key would take the later outage's create and updates for repeats.
    const of = p.id !== null ? `-${p.id}` : p.after !== undefined ? `-after-${p.after}` : ''
    const headers = { authorization: `OAuth ${c.statusPageApiKey}`, 'idempotency-key': `${key}${of}-${next.status}${next.round > 0 ? `-${next.round}` : ''}`.replace(/[^\x21-\x7e]/gu, '_') }
    const metadata = { breakwater: { incident_key: key, ...next.metadata } }
    // Created but its id unknown (the page answered without one), or a resolve of one never created.
    if (p.id === null && (p.status !== null || next.status === 'resolved')) {
      this.logger.error({ event: 'statuspage_unknown_incident', incidentKey: key, status: next.status }, 'status page incident id unknown; not updating it by guess — update it by hand if it exists')
      this.onUnsent()
      this.pump(key, p)
      return
    }
    p.busy = true
    p.sending = next.status
    const id = p.id
    const creating = id === null
    const settled = (ok: boolean, answer: unknown, retryable = true, asked: number | null = null): void => {
      p.busy = false
      p.sending = undefined
      if (ok) {
        if (creating) {
          p.failedCreates = 0
          const given = (answer as { id?: unknown } | null)?.id
          if (typeof given === 'string' && given !== '') {
            p.id = given
          } else {
            p.unsure = true
            this.logger.error({ event: 'statuspage_unknown_incident', incidentKey: key }, 'the status page answered a create without an incident id')
          }
        }
        p.status = next.status
        p.round = next.round
        this.onChange(key, withRound(p.id, p.status, p.round))
      } else if (creating) {
        // It may have been created all the same: the next try looks for it first.
        p.unsure = true
        if (++p.failedCreates < c.maxAttempts && retryable) {
          p.queue.unshift(next)
          p.busy = true
          const backoff = retryDelayMs(p.failedCreates, asked)
          this.logger.warn({ event: 'notification_retry', channel: 'statuspage', attempt: p.failedCreates, retryInMs: Math.round(backoff) }, 'status page incident not created; will look for it and retry')
          this.retrying++
          setTimeout(() => { this.retrying--; p.busy = false; this.pump(key, p) }, backoff).unref()
          return
        }
        this.logger.error({ event: 'notification_failed', channel: 'statuspage', attempts: p.failedCreates }, 'notification not delivered')
        this.onUnsent()
        p.failedCreates = 0
      }
      this.pump(key, p)
    }
    if (id === null) {
      // Persisted before it is sent: a sidecar stopped before the answer looks for it first.
      // With the page incident it follows: its retry after a restart keeps this create's key.
      this.onChange(key, p.after !== undefined ? { id: null, status: CREATING, after: p.after } : { id: null, status: CREATING })
      // Statuspage: incident[name], incident[status], incident[body], incident[impact_override].
      this.send({ method: 'POST', url: base, headers, once: true, body: { incident: { name: next.name, status: next.status, body: next.text, impact_override: 'major', metadata } } }, settled)
    } else {
      this.send({ method: 'PATCH', url: `${base}/${encodeURIComponent(id)}`, headers, body: { incident: { status: next.status, body: next.text, metadata } } }, settled)
    }
  }

  /**
   * Look for the page incident of `key` among the page's unresolved incidents (one request, a
   * read); then go on with what waits, updating the one found or creating it.
   */
  private lookUp (key: string, p: PageIncident, base: string, authorization: string): void {
    p.busy = true
    this.send({ method: 'GET', url: `${base}/unresolved?per_page=100`, headers: { authorization }, body: null, once: true, lookup: true }, (ok, answer) => {
      p.busy = false
      p.unsure = false
      const found = ok && Array.isArray(answer)
        ? (answer as ListedIncident[]).find((i) => i?.metadata?.breakwater?.incident_key === key && typeof i.id === 'string' && i.id !== '' && typeof i.status === 'string' && i.status in RANK)
        : undefined
      if (found !== undefined) {
        p.id = found.id as string
        p.status = found.status as PageStatus
        // The page does not say which round: its status alone is what stands there now.
        p.round = 0
        this.logger.info({ event: 'statuspage_incident_found', incidentKey: key, id: p.id, status: p.status }, 'status page incident found on the page; updating it instead of creating another')
        this.onChange(key, { id: p.id, status: p.status })
      } else if (!ok) {
        this.logger.warn({ event: 'statuspage_lookup_failed', incidentKey: key }, 'could not look for the status page incident on the page; going on without it')
      }
      this.pump(key, p)
    })
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

function fresh (): PageIncident {
  return { id: null, status: null, round: 0, queue: [], busy: false, unsure: false, failedCreates: 0 }
}

function roundOf (round: unknown): number {
  return typeof round === 'number' && Number.isInteger(round) && round > 0 ? round : 0
}
