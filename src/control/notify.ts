/**
 * Notifications (SPEC §8): Slack, PagerDuty Events API v2, a status page, generic webhooks.
 *
 * Delivered in the background from a bounded queue with retries and exponential backoff:
 * never on the request path, so a slow or failing receiver cannot slow proxying. When the
 * queue is full the oldest message is dropped (counted), never memory without bound. Failures
 * are logged (channel and status only: webhook URLs, routing keys and API keys never reach a
 * log line) and counted in `breakwater_notifications_failed_total{channel}`.
 *
 * Deduplication across a fleet (SPEC §13): the PagerDuty `dedup_key` and the status page
 * incident key derive only from service, version and trigger name, so fifty sidecars that fire
 * together open one incident.
 */
import { createHash } from 'node:crypto'
import { request } from 'undici'
import type { Logger } from 'pino'
import type { NotificationsConfig } from '../config/types.js'
import { AlertmanagerChannel } from './alertmanager.js'

export type EventKind = 'trigger_fired' | 'mitigation_applied' | 'mitigation_failed' | 'mitigation_lifted' | 'restoration_verified' | 'restoration_failed'

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
}

export type Channel = 'slack' | 'pagerduty' | 'statuspage' | 'webhook'

interface Message {
  channel: Channel
  url: string
  headers: Record<string, string>
  body: unknown
  method: 'POST' | 'PATCH'
  attempt: number
  /** Called with the parsed response body of a successful delivery. */
  onDelivered?: (body: unknown) => void
}

/** The incident key of an event: the same on every sidecar of the fleet. */
export function incidentKey (service: string, version: string, trigger: string | null): string {
  return `breakwater-${createHash('sha256').update(`${service}\u0000${version}\u0000${trigger ?? 'operator'}`).digest('hex').slice(0, 24)}`
}

const CONCURRENCY = 4

export class Notifier {
  readonly failed = new Map<Channel, number>()
  readonly sent = new Map<Channel, number>()
  dropped = 0
  private readonly queue: Message[] = []
  private inFlight = 0
  /** Messages waiting out a retry backoff, oldest first; they count against `queueSize` too. */
  private readonly timers = new Map<NodeJS.Timeout, Message>()
  private stopped = false
  /** Status page incident ids by incident key (from their creation). */
  private readonly statusPageIncidents = new Map<string, string>()

  /** Alertmanager alerts (SPEC §16): every sidecar posts its own; Alertmanager groups them. */
  readonly alertmanager: AlertmanagerChannel

  constructor (private config: () => NotificationsConfig, private readonly logger: Logger) {
    this.alertmanager = new AlertmanagerChannel(config, logger)
  }

  /** Queue an event for every configured channel. Returns at once. */
  notify (event: NotificationEvent): void {
    this.alertmanager.handle(event)
    const c = this.config()
    const key = incidentKey(event.service, event.version, event.trigger)
    if (c.slackWebhookUrl !== null) {
      this.enqueue({ channel: 'slack', url: c.slackWebhookUrl, method: 'POST', headers: {}, attempt: 0, body: slackPayload(c, event) })
    }
    if (c.pagerDutyRoutingKey !== null && event.trigger !== null && (event.kind === 'trigger_fired' || event.kind === 'restoration_verified')) {
      this.enqueue({
        channel: 'pagerduty',
        url: c.pagerDutyUrl,
        method: 'POST',
        headers: {},
        attempt: 0,
        body: {
          routing_key: c.pagerDutyRoutingKey,
          event_action: event.kind === 'trigger_fired' ? 'trigger' : 'resolve',
          dedup_key: key,
          payload: {
            summary: event.summary.slice(0, 1024),
            source: `breakwater/${event.service}`,
            severity: 'critical',
            timestamp: event.time,
            component: event.service,
            group: event.version,
            class: event.trigger ?? 'operator',
            custom_details: { ...event.details, service_id: c.pagerDutyServiceId, version: event.version, trigger: event.trigger }
          }
        }
      })
    }
    if (c.statusPageId !== null && c.statusPageApiKey !== null && event.trigger !== null && (event.kind === 'trigger_fired' || event.kind === 'restoration_verified')) {
      const base = `${c.statusPageUrl}/v1/pages/${encodeURIComponent(c.statusPageId)}/incidents`
      const auth = { authorization: `OAuth ${c.statusPageApiKey}`, 'idempotency-key': key }
      if (event.kind === 'trigger_fired') {
        this.enqueue({
          channel: 'statuspage', url: base, method: 'POST', headers: auth, attempt: 0,
          body: { incident: { name: `${event.service}: degraded service`, status: 'investigating', body: event.summary, metadata: { breakwater: { incident_key: key, trigger: event.trigger, version: event.version } } } },
          onDelivered: (b) => { const id = (b as { id?: unknown } | null)?.id; if (typeof id === 'string') this.statusPageIncidents.set(key, id) }
        })
      } else {
        const id = this.statusPageIncidents.get(key) ?? key
        this.enqueue({ channel: 'statuspage', url: `${base}/${encodeURIComponent(id)}`, method: 'PATCH', headers: auth, attempt: 0, body: { incident: { status: 'resolved', body: event.summary, metadata: { breakwater: { incident_key: key } } } } })
      }
    }
    for (const url of c.webhooks) {
      this.enqueue({ channel: 'webhook', url, method: 'POST', headers: { 'idempotency-key': `${key}-${event.kind}` }, attempt: 0, body: { event: event.kind, service: event.service, version: event.version, trigger: event.trigger, summary: event.summary, incidentKey: key, time: event.time, details: event.details } })
    }
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
      this.logger.warn({ event: 'notification_dropped', channel: old.channel }, 'notification queue full; dropped the oldest message')
    }
    this.queue.push(m)
    this.pump()
  }

  private pump (): void {
    while (!this.stopped && this.inFlight < CONCURRENCY && this.queue.length > 0) {
      const m = this.queue.shift() as Message
      this.inFlight++
      void this.deliver(m).finally(() => {
        this.inFlight--
        this.pump()
      })
    }
  }

  private async deliver (m: Message): Promise<void> {
    m.attempt++
    let status = 0
    let failure: string | null = null
    try {
      const res = await request(m.url, {
        method: m.method,
        headers: { 'content-type': 'application/json', 'user-agent': 'breakwater-notify', ...m.headers },
        body: JSON.stringify(m.body),
        headersTimeout: 10_000,
        bodyTimeout: 10_000
      })
      status = res.statusCode
      const text = await res.body.text()
      if (status >= 200 && status < 300) {
        this.sent.set(m.channel, (this.sent.get(m.channel) ?? 0) + 1)
        if (m.onDelivered !== undefined) {
          try { m.onDelivered(JSON.parse(text)) } catch { /* not JSON: no id */ }
        }
        return
      }
      failure = `status ${status}`
    } catch (err) {
      failure = (err as { code?: string }).code ?? 'request failed'
    }
    const final = m.attempt >= this.config().maxAttempts || (status >= 400 && status < 500 && status !== 408 && status !== 429)
    if (final) {
      this.failed.set(m.channel, (this.failed.get(m.channel) ?? 0) + 1)
      this.logger.error({ event: 'notification_failed', channel: m.channel, attempts: m.attempt, failure }, 'notification not delivered')
      return
    }
    const backoff = Math.min(30_000, 500 * 2 ** (m.attempt - 1)) * (0.75 + Math.random() * 0.5)
    this.logger.warn({ event: 'notification_retry', channel: m.channel, attempt: m.attempt, failure, retryInMs: Math.round(backoff) }, 'notification failed; will retry')
    const timer = setTimeout(() => {
      this.timers.delete(timer)
      this.queue.unshift(m)
      this.pump()
    }, backoff)
    timer.unref()
    this.timers.set(timer, m)
  }

  /** Messages waiting or being delivered. */
  get pending (): number {
    return this.queue.length + this.inFlight + this.timers.size
  }

  stop (): void {
    this.alertmanager.stop()
    this.stopped = true
    for (const t of this.timers.keys()) clearTimeout(t)
    this.timers.clear()
    this.queue.length = 0
  }
}

function slackPayload (c: NotificationsConfig, e: NotificationEvent): Record<string, unknown> {
  const icon = e.kind === 'trigger_fired' ? ':rotating_light:' : e.kind === 'restoration_verified' ? ':white_check_mark:' : e.kind === 'restoration_failed' || e.kind === 'mitigation_failed' ? ':x:' : ':shield:'
  const text = `${icon} *${e.service}* ${e.version} — ${e.summary}`
  const facts = Object.entries(e.details)
    .filter(([, v]) => v !== null && v !== undefined && typeof v !== 'object')
    .slice(0, 10)
    .map(([k, v]) => `*${k}*: ${String(v)}`)
  return {
    ...(c.slackChannel !== null ? { channel: c.slackChannel } : {}),
    text,
    blocks: [
      { type: 'section', text: { type: 'mrkdwn', text } },
      ...(facts.length > 0 ? [{ type: 'section', fields: facts.map((f) => ({ type: 'mrkdwn', text: f })) }] : []),
      { type: 'context', elements: [{ type: 'mrkdwn', text: `${e.kind.replace(/_/g, ' ')} · ${e.trigger !== null ? `trigger ${e.trigger}` : 'operator'} · ${e.time}` }] }
    ]
  }
}
