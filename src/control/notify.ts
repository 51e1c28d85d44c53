/**
 * Notifications (SPEC §8): Slack, PagerDuty Events API v2, a status page, generic webhooks.
 *
 * Delivered in the background from a bounded queue with retries and exponential backoff:
 * never on the request path, so a slow or failing receiver cannot slow proxying. When the
 * queue is full the oldest message is dropped (counted), never memory without bound. One
 * incident's messages to one receiver go in the order they happened, one at a time, a retry
 * keeping its place: a PagerDuty `trigger` retried after its `resolve` was accepted would open
 * again an alert whose incident is over (Events API v2 acts on events in the order it receives
 * them), and a webhook or Slack reader would see "lifted" before "applied". Failures
 * are logged (channel and status only: webhook URLs, routing keys and API keys never reach a
 * log line) and counted in `breakwater_notifications_failed_total{channel}`.
 *
 * Deduplication across a fleet (SPEC §13): the PagerDuty `dedup_key` and the status page
 * incident key derive only from service, version and trigger name, so fifty sidecars that fire
 * together open one incident.
 */
import { createHash } from 'node:crypto'
import { request } from '../undici.js'
import type { Logger } from 'pino'
import type { NotificationsConfig } from '../config/types.js'
import { StatusPageLifecycle, type PageStatus } from './status-page.js'
import { AlertmanagerChannel } from './alertmanager.js'
import { retryAfterMs, retryDelayMs } from './retry-after.js'

/**
 * `escalated`: the incident was not verified restored within `escalateAfter`, or its
 * verification failed (SPEC §19) — sent once per incident, at `critical` severity.
 */
export type EventKind = 'trigger_fired' | 'mitigation_applied' | 'mitigation_failed' | 'mitigation_lifted' | 'restoration_verified' | 'restoration_failed' | 'escalated'

/** One thing worth telling people about. */
export interface NotificationEvent {
  kind: EventKind
  service: string
  version: string
  /** Trigger name, or null for an operator's action. */
  trigger: string | null
  /** One line a human reads first. */
  summary: string
  /** Everything else (numbers, the mitigation record, the triage). */
  details: Record<string, unknown>
  time: string
  /**
   * Which incident the event belongs to: in a fleet, the id its first leader wrote on the
   * incident key (the same on every sidecar that takes it over); alone, the local incident id.
   * Part of the webhook `Idempotency-Key` (`webhookKey`).
   */
  incident?: string
}

export type Channel = 'slack' | 'pagerduty' | 'statuspage' | 'webhook'

interface Message {
  channel: Channel
  url: string
  headers: Record<string, string>
  body: unknown
  method: 'POST' | 'PATCH' | 'GET'
  attempt: number
  /**
   * Messages of one lane (one incident at one receiver) are delivered one at a time, in order;
   * null: no order to keep (the status page lifecycle orders its own requests).
   */
  lane: string | null
  /** One attempt only, not counted or logged as failed: its sender retries it, or gives up and says so. */
  once?: boolean
  /** A read (the status page look-up), not a notification: not counted or logged as one. */
  lookup?: boolean
  /**
   * Called once when the message is delivered (with the parsed answer) or given up on
   * (`retryable`: worth sending again — not refused with a 4xx other than 408 or 429;
   * `retryAfterMs`: how long the receiver asked to be left alone, from its `Retry-After`).
   */
  onSettled?: (ok: boolean, body: unknown, retryable?: boolean, retryAfterMs?: number | null) => void
}

/** The incident key of an event: the same on every sidecar of the fleet. */
export function incidentKey (service: string, version: string, trigger: string | null): string {
  return `breakwater-${createHash('sha256').update(`${service}\u0000${version}\u0000${trigger ?? 'operator'}`).digest('hex').slice(0, 24)}`
}

/**
 * The webhook `Idempotency-Key` of an event: the same for every attempt of one delivery, and for
 * a successor re-sending its fleet leader's announcement (the fleet incident id goes with the
 * incident key), but another for each incident of a key and each mitigation of an incident — a
 * receiver that honours the header drops a repeated key as a duplicate, and a second incident
 * announced under the first one's key would never reach anyone.
 */
export function webhookKey (event: NotificationEvent, key = incidentKey(event.service, event.version, event.trigger)): string {
  const mitigation = event.kind.startsWith('mitigation_') && typeof event.details.id === 'string' ? event.details.id : undefined
  // A direct kill's id holds its flag key, which a flag source may spell in any characters: a
  // header value carries visible ASCII only (RFC 9110 §5.5), the rest is percent-encoded.
  return [key, event.incident, mitigation, event.kind].filter((part) => part !== undefined && part !== '').join('-').replace(/[^\x21-\x7e]/gu, (c) => [...Buffer.from(c)].map((b) => `%${b.toString(16).toUpperCase().padStart(2, '0')}`).join(''))
}

/**
 * Deliveries in flight to one receiver (a channel, or one webhook URL): a receiver that hangs
 * holds only its own, never a page to PagerDuty behind a Slack that does not answer.
 */
const CONCURRENCY = 4

/**
 * The receiver a notification goes to, as a fleet incident key records that it took the
 * incident's announcement: `slack`, `pagerduty`, or `webhook:` and a digest of the URL (a webhook
 * URL is a secret, and never leaves the sidecar as it is).
 */
export function receiverName (channel: Channel, url: string): string {
  return channel === 'webhook' ? `webhook:${createHash('sha256').update(url).digest('hex').slice(0, 16)}` : channel
}

/** The receiver a message goes to, for `CONCURRENCY`. */
function receiverOf (m: Message): string {
  return m.channel === 'webhook' ? `webhook\u0000${m.url}` : m.channel
}

export class Notifier {
  readonly failed = new Map<Channel, number>()
  readonly sent = new Map<Channel, number>()
  dropped = 0
  private readonly queue: Message[] = []
  private inFlight = 0
  /** Deliveries in flight per receiver (`receiverOf`). */
  private readonly inFlightTo = new Map<string, number>()
  /** Messages waiting out a retry backoff, oldest first; they count against `queueSize` too. */
  private readonly timers = new Map<NodeJS.Timeout, Message>()
  /** The message each busy lane is delivering (or waiting to retry); the lane's next ones wait. */
  private readonly lanes = new Map<string, Message>()
  private stopped = false
  /** The status page incident of each incident key: created once, then updated by its id. */
  readonly statusPage: StatusPageLifecycle

  /** Alertmanager alerts (SPEC §16): every sidecar posts its own; Alertmanager groups them. */
  readonly alertmanager: AlertmanagerChannel

  constructor (private config: () => NotificationsConfig, private readonly logger: Logger) {
    this.statusPage = new StatusPageLifecycle(config, (req, settled) => {
      this.enqueue({ channel: 'statuspage', attempt: 0, lane: null, ...req, onSettled: settled })
    }, logger)
    this.statusPage.onUnsent = () => { this.failed.set('statuspage', (this.failed.get('statuspage') ?? 0) + 1) }
    this.alertmanager = new AlertmanagerChannel(config, logger)
  }

  /**
   * Move the status page incident of a trigger's incident to `status` (SPEC §19): the events
   * below do it on their own; the verifier calls this for `monitoring`.
   */
  pageStatus (event: Pick<NotificationEvent, 'service' | 'version' | 'trigger' | 'summary'>, status: PageStatus): void {
    const c = this.config()
    if (c.statusPageId === null || c.statusPageApiKey === null || event.trigger === null) return
    this.statusPage.advance(incidentKey(event.service, event.version, event.trigger), status, `${event.service}: degraded service`, event.summary, { trigger: event.trigger, version: event.version })
  }

  /**
   * The verification the status page incident of a trigger's incident announced (`monitoring`)
   * failed: back to `identified`, so the page does not go on saying a fix is being watched.
   */
  pageReopened (event: Pick<NotificationEvent, 'service' | 'version' | 'trigger' | 'summary'>): void {
    const c = this.config()
    if (c.statusPageId === null || c.statusPageApiKey === null || event.trigger === null) return
    this.statusPage.reopen(incidentKey(event.service, event.version, event.trigger), `${event.service}: degraded service`, event.summary, { trigger: event.trigger, version: event.version })
  }

  /**
   * Queue an event for every configured channel. Returns at once. `delivered`, when given, is
   * called once Slack, PagerDuty and every webhook took it (at once when none is configured);
   * never when one of them gave up or dropped it. `announce` (a fleet incident's announcement,
   * SPEC §16): `skip` names the receivers (`receiverName`) that took it already from a leader
   * before this sidecar, which are not sent it again; `accepted` is told each receiver that takes
   * it, as it does.
   */
  notify (event: NotificationEvent, delivered?: () => void, announce: { skip?: readonly string[], accepted?: (receiver: string) => void } = {}): void {
    this.alertmanager.handle(event)
    const c = this.config()
    const key = incidentKey(event.service, event.version, event.trigger)
    const skip = new Set(announce.skip ?? [])
    let waiting = 1
    let lost = false
    const settled = (ok: boolean): void => {
      if (!ok) lost = true
      if (--waiting === 0 && !lost) delivered?.()
    }
    const enqueue = (m: Message): void => {
      const name = receiverName(m.channel, m.url)
      if (skip.has(name)) return
      waiting++
      this.enqueue({ ...m, onSettled: (ok) => { if (ok) announce.accepted?.(name); settled(ok) } })
    }
    if (c.slackWebhookUrl !== null) {
      enqueue({ channel: 'slack', url: c.slackWebhookUrl, method: 'POST', headers: {}, attempt: 0, lane: `slack\u0000${key}`, body: slackPayload(c, event) })
    }
    for (const pd of pagerDutyEvents(c, event)) {
      enqueue({
        channel: 'pagerduty',
        url: c.pagerDutyUrl,
        method: 'POST',
        headers: {},
        attempt: 0,
        lane: `pagerduty\u0000${pd.routingKey}\u0000${key}`,
        body: {
          routing_key: pd.routingKey,
          event_action: pd.action,
          dedup_key: key,
          payload: {
            summary: event.summary.slice(0, 1024),
            source: `breakwater/${event.service}`,
            severity: pd.severity,
            timestamp: event.time,
            component: event.service,
            group: event.version,
            class: event.trigger ?? 'operator',
            custom_details: { ...event.details, service_id: c.pagerDutyServiceId, version: event.version, trigger: event.trigger }
          }
        }
      })
    }
    const page = PAGE_STATUS[event.kind]
    if (page !== undefined) this.pageStatus(event, page)
    for (const url of c.webhooks) {
      enqueue({ channel: 'webhook', url, method: 'POST', headers: { 'idempotency-key': webhookKey(event, key) }, attempt: 0, lane: `webhook\u0000${url}\u0000${key}`, body: { event: event.kind, service: event.service, version: event.version, trigger: event.trigger, summary: event.summary, incidentKey: key, time: event.time, details: event.details } })
    }
    // Every message is queued: the count held for queueing is let go.
    settled(true)
  }

  private enqueue (m: Message): void {
    if (this.stopped) return
    const max = this.config().queueSize
    // Held = queued + waiting for a retry; the oldest goes first when that reaches the cap.
    while (this.queue.length + this.timers.size >= max) {
      let old: Message
      const waiting = this.timers.entries().next()
      if (!waiting.done) {
        clearTimeout(waiting.value[0])
        this.timers.delete(waiting.value[0])
        old = waiting.value[1]
      } else if (this.queue.length > 0) {
        old = this.queue.shift() as Message
      } else {
        break
      }
      this.dropped++
      this.release(old)
      this.logger.warn({ event: 'notification_dropped', channel: old.channel }, 'notification queue full; dropped the oldest message')
      old.onSettled?.(false, null)
    }
    this.queue.push(m)
    this.pump()
  }

  private pump (): void {
    for (let i = 0; !this.stopped && i < this.queue.length;) {
      const m = this.queue[i] as Message
      const holder = m.lane === null ? undefined : this.lanes.get(m.lane)
      const to = receiverOf(m)
      const busy = this.inFlightTo.get(to) ?? 0
      // Behind an earlier message of its lane (being delivered or waiting to be retried), or its receiver is full.
      if ((holder !== undefined && holder !== m) || busy >= CONCURRENCY) { i++; continue }
      this.queue.splice(i, 1)
      if (m.lane !== null) this.lanes.set(m.lane, m)
      this.inFlight++
      this.inFlightTo.set(to, busy + 1)
      void this.deliver(m).finally(() => {
        this.inFlight--
        const left = (this.inFlightTo.get(to) ?? 1) - 1
        if (left === 0) this.inFlightTo.delete(to)
        else this.inFlightTo.set(to, left)
        this.pump()
      })
    }
  }

  /** `m` is settled (delivered, given up on or dropped): the next message of its lane may go. */
  private release (m: Message): void {
    if (m.lane !== null && this.lanes.get(m.lane) === m) this.lanes.delete(m.lane)
  }

  private async deliver (m: Message): Promise<void> {
    m.attempt++
    let status = 0
    let failure: string | null = null
    let asked: number | null = null
    try {
      const res = await request(m.url, {
        method: m.method,
        headers: m.method === 'GET' ? { 'user-agent': 'breakwater-notify', ...m.headers } : { 'content-type': 'application/json', 'user-agent': 'breakwater-notify', ...m.headers },
        body: m.method === 'GET' ? null : JSON.stringify(m.body),
        headersTimeout: 10_000,
        bodyTimeout: 10_000
      })
      status = res.statusCode
      const text = await res.body.text()
      if (status >= 200 && status < 300) {
        this.release(m)
        if (m.lookup !== true) this.sent.set(m.channel, (this.sent.get(m.channel) ?? 0) + 1)
        let answer: unknown = null
        try { answer = JSON.parse(text) } catch { /* not JSON */ }
        m.onSettled?.(true, answer)
        return
      }
      failure = `status ${status}`
      if (status === 429 || status === 503) asked = retryAfterMs(res.headers['retry-after'], Date.now())
    } catch (err) {
      failure = (err as { code?: string }).code ?? 'request failed'
    }
    const refused = status >= 400 && status < 500 && status !== 408 && status !== 429
    if (m.lookup === true || m.once === true) {
      this.release(m)
      m.onSettled?.(false, null, !refused, asked)
      return
    }
    const final = m.attempt >= this.config().maxAttempts || refused
    if (final) {
      this.release(m)
      this.failed.set(m.channel, (this.failed.get(m.channel) ?? 0) + 1)
      this.logger.error({ event: 'notification_failed', channel: m.channel, attempts: m.attempt, failure }, 'notification not delivered')
      m.onSettled?.(false, null)
      return
    }
    const backoff = retryDelayMs(m.attempt, asked)
    this.logger.warn({ event: 'notification_retry', channel: m.channel, attempt: m.attempt, failure, retryInMs: Math.round(backoff) }, 'notification failed; will retry')
    const timer = setTimeout(() => {
      this.timers.delete(timer)
      this.queue.unshift(m)
      this.pump()
    }, backoff)
    timer.unref()
    this.timers.set(timer, m)
  }

  /** Messages waiting or being delivered (status page creates waiting to be retried too). */
  get pending (): number {
    return this.queue.length + this.inFlight + this.timers.size + this.statusPage.retrying
  }

  /**
   * Give what is queued, being delivered or waiting for a retry up to `ms` to be settled (a
   * stopping sidecar's last words: a PagerDuty `resolve`, a lifted mitigation). A retry waiting
   * out its backoff goes at once: there is no later for it.
   */
  async flush (ms: number): Promise<void> {
    const deadline = performance.now() + ms
    for (const [timer, m] of this.timers) {
      clearTimeout(timer)
      this.timers.delete(timer)
      this.queue.unshift(m)
    }
    this.pump()
    while (this.pending > 0 && performance.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20))
  }

  /** Stop; what was not delivered by now is dropped, counted and logged (never lost without a word). */
  stop (): void {
    this.alertmanager.stop()
    this.stopped = true
    for (const m of [...this.queue, ...this.timers.values()]) {
      this.dropped++
      this.logger.warn({ event: 'notification_dropped', channel: m.channel, cause: 'shutdown' }, 'sidecar stopping; dropped an undelivered notification')
    }
    for (const t of this.timers.keys()) clearTimeout(t)
    this.timers.clear()
    this.queue.length = 0
    this.lanes.clear()
  }
}

/** The status page status an event moves a trigger's page incident to (monitoring comes from the verifier). */
const PAGE_STATUS: Partial<Record<EventKind, PageStatus>> = { trigger_fired: 'investigating', mitigation_applied: 'identified', restoration_verified: 'resolved' }

/**
 * PagerDuty Events API v2 events for one notification, all with the incident's `dedup_key`:
 * a trigger's detection opens an alert at `error`; an escalation raises it at `critical` (to
 * `pagerDutyEscalationRoutingKey` when set, so it can page a second service); a verified
 * restoration resolves it on both routing keys. Operators' incidents reach PagerDuty only once
 * escalated (and are then resolved the same way).
 */
function pagerDutyEvents (c: NotificationsConfig, e: NotificationEvent): Array<{ routingKey: string, action: 'trigger' | 'resolve', severity: 'error' | 'critical' }> {
  if (c.pagerDutyRoutingKey === null) return []
  const escalationKey = c.pagerDutyEscalationRoutingKey ?? c.pagerDutyRoutingKey
  switch (e.kind) {
    case 'trigger_fired':
      return e.trigger === null ? [] : [{ routingKey: c.pagerDutyRoutingKey, action: 'trigger', severity: 'error' }]
    case 'escalated':
      return [{ routingKey: escalationKey, action: 'trigger', severity: 'critical' }]
    case 'restoration_verified': {
      // An older incident of the same key, escalated and carried on by this one, was escalated under this dedup_key too.
      const escalated = e.details.escalated === true || (Array.isArray(e.details.supersededEscalated) && e.details.supersededEscalated.length > 0)
      if (e.trigger === null && !escalated) return []
      const keys = new Set([...(e.trigger !== null ? [c.pagerDutyRoutingKey] : []), ...(escalated ? [escalationKey] : [])])
      return [...keys].map((routingKey) => ({ routingKey, action: 'resolve', severity: 'critical' }))
    }
    default:
      return []
  }
}

function slackPayload (c: NotificationsConfig, e: NotificationEvent): Record<string, unknown> {
  const icon = e.kind === 'escalated' ? ':fire:' : e.kind === 'trigger_fired' ? ':rotating_light:' : e.kind === 'restoration_verified' ? ':white_check_mark:' : e.kind === 'restoration_failed' || e.kind === 'mitigation_failed' ? ':x:' : ':shield:'
  const text = `${icon} *${e.service}* ${e.version} — ${e.summary}`
  const facts = Object.entries(e.details)
    .filter(([, v]) => v !== null && v !== undefined && typeof v !== 'object')
    .map(([k, v]) => ({ type: 'mrkdwn', text: `*${k}*: ${String(v)}` }))
  // Slack takes at most 10 fields in a section: the rest go in the next ones, never dropped.
  const sections = []
  for (let i = 0; i < facts.length; i += 10) sections.push({ type: 'section', fields: facts.slice(i, i + 10) })
  return {
    ...(c.slackChannel !== null ? { channel: c.slackChannel } : {}),
    text,
    blocks: [
      { type: 'section', text: { type: 'mrkdwn', text } },
      ...sections,
      { type: 'context', elements: [{ type: 'mrkdwn', text: `${e.kind.replace(/_/g, ' ')} · ${e.trigger !== null ? `trigger ${e.trigger}` : 'operator'} · ${e.time}` }] }
    ]
  }
}
