/**
 * The Alertmanager channel (SPEC §16): a fired trigger becomes an Alertmanager API v2 alert,
 * `POST {url}/api/v2/alerts`, with stable labels — `alertname="BreakwaterTriggerFired"`,
 * `service`, `trigger`, `severity`, `instance` (plus `notifications.alertmanager.labels`) — and
 * annotations `summary`, `description`, `runbook` (the triage command).
 *
 * Every sidecar posts its own alert (its `instance` differs) and Alertmanager's grouping turns a
 * fleet's alerts into one notification. While the trigger fires the alert is posted again every
 * `repeatInterval` (default 60 s, under Alertmanager's default `resolve_timeout` of 5 m, so it
 * never resolves on its own while the outage lasts); it is resolved (`endsAt`) when restoration
 * is verified or the trigger re-arms. Posting happens beside the control plane and never blocks
 * it; a failed post is logged once per failure streak and retried by the next repeat.
 */
import { request } from 'undici'
import type { Logger } from 'pino'
import type { NotificationsConfig } from '../config/types.js'
import type { NotificationEvent } from './notify.js'

interface Alert {
  labels: Record<string, string>
  annotations: Record<string, string>
  startsAt: string
  endsAt?: string
}

interface Firing {
  alert: Alert
  timer: NodeJS.Timeout
}

export class AlertmanagerChannel {
  /** Alerts posted (each URL counts once). */
  posted = 0
  failed = 0
  /** This sidecar's `instance` label. */
  instance = ''
  /** The triage command for this sidecar (the `runbook` annotation). */
  runbook = 'breakwater triage'
  private readonly firing = new Map<string, Firing>()
  private failing = false

  constructor (private readonly config: () => NotificationsConfig, private readonly logger: Logger) {}

  /** Fire on `trigger_fired`, resolve on `restoration_verified`; other events are not alerts. */
  handle (event: NotificationEvent): void {
    const am = this.config().alertmanager
    if (am === null || event.trigger === null) return
    if (event.kind === 'trigger_fired') this.fire(event)
    else if (event.kind === 'restoration_verified') this.resolve(event.trigger)
  }

  private fire (event: NotificationEvent): void {
    const am = this.config().alertmanager
    const trigger = event.trigger
    if (am === null || trigger === null) return
    const existing = this.firing.get(trigger)
    if (existing !== undefined) clearInterval(existing.timer)
    const alert: Alert = {
      labels: { ...am.labels, alertname: 'BreakwaterTriggerFired', service: event.service, trigger, severity: 'critical', instance: this.instance },
      annotations: {
        summary: `${event.service}: trigger ${trigger} fired`,
        description: event.summary,
        runbook: this.runbook
      },
      startsAt: existing?.alert.startsAt ?? event.time
    }
    const timer = setInterval(() => { void this.post(alert) }, am.repeatIntervalMs)
    timer.unref()
    this.firing.set(trigger, { alert, timer })
    void this.post(alert)
  }

  /** The incident of `trigger` is over here: resolve its alert (no-op when none fires). */
  resolve (trigger: string): void {
    const f = this.firing.get(trigger)
    if (f === undefined) return
    clearInterval(f.timer)
    this.firing.delete(trigger)
    void this.post({ ...f.alert, endsAt: new Date().toISOString() })
  }

  private async post (alert: Alert): Promise<void> {
    const am = this.config().alertmanager
    if (am === null) return
    await Promise.all(am.urls.map(async (url) => {
      try {
        const res = await request(`${url}/api/v2/alerts`, {
          method: 'POST',
          headers: { 'content-type': 'application/json', 'user-agent': 'breakwater-notify' },
          body: JSON.stringify([alert]),
          headersTimeout: 10_000,
          bodyTimeout: 10_000
        })
        await res.body.text()
        if (res.statusCode < 200 || res.statusCode >= 300) throw new Error(`status ${res.statusCode}`)
        this.posted++
        if (this.failing) this.logger.info({ event: 'notification', channel: 'alertmanager' }, 'Alertmanager reachable again')
        this.failing = false
      } catch (err) {
        this.failed++
        if (!this.failing) this.logger.warn({ event: 'notification_failed', channel: 'alertmanager', failure: (err as { code?: string }).code ?? (err as Error).message }, 'alert not posted to Alertmanager; the next repeat retries')
        this.failing = true
      }
    }))
  }

  stop (): void {
    for (const f of this.firing.values()) clearInterval(f.timer)
    this.firing.clear()
  }
}
