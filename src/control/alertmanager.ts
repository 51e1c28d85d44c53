/**
 * The Alertmanager channel (SPEC §16, §19). A fired trigger becomes an Alertmanager API v2
 * alert, `POST {url}/api/v2/alerts`, with stable labels — `alertname="BreakwaterTriggerFired"`,
 * `service`, `trigger`, `severity="critical"`, `instance` (plus `notifications.alertmanager.labels`)
 * — and annotations `summary`, `description`, `runbook` (the triage command).
 *
 * Every sidecar posts its own alert (its `instance` differs) and Alertmanager's grouping turns a
 * fleet's alerts into one notification. While the trigger fires the alert is posted again every
 * `repeatInterval` (default 60 s, under Alertmanager's default `resolve_timeout` of 5 m, so it
 * never resolves on its own while the outage lasts); it is resolved (`endsAt`) when restoration
 * is verified or the trigger re-arms.
 *
 * An escalation (SPEC §19) is a second alert, `alertname="BreakwaterIncidentEscalated"`,
 * `severity="critical"`, `service`, `trigger` (`operator` for an operator's incident) and
 * `version`: the labels of the fleet's incident key, without `instance`, since a fleet escalates
 * an incident once (its leader) and a sidecar that takes over must resolve the same alert. It is
 * re-posted like the other until restoration is verified (on the sidecar that escalated, or the
 * one that took over); a trigger that merely re-arms does not end it — nobody verified anything.
 * A restart does not end it either: the verifier resumes the escalations of the incidents it
 * takes back from `stateDir` (`resumeEscalation`, with the original `startsAt`), since an alert
 * not posted again within Alertmanager's `resolve_timeout` is resolved by Alertmanager itself.
 *
 * Posting happens beside the control plane and never blocks it; a failed post is logged once per
 * failure streak and retried by the next repeat. A resolution has no next repeat: one that an
 * Alertmanager did not take is posted to it again every `repeatInterval` until it does (or the
 * alert fires again), for at most `RESOLVE_RETRY_MS` — else the alert stays active there until
 * its `resolve_timeout` after the incident ended.
 */
import { request } from '../undici.js'
import type { Logger } from 'pino'
import type { NotificationsConfig } from '../config/types.js'
import type { NotificationEvent } from './notify.js'

/** How long a resolution an Alertmanager did not take is posted again (see above). */
const RESOLVE_RETRY_MS = 60 * 60_000

interface Alert {
  labels: Record<string, string>
  annotations: Record<string, string>
  startsAt: string
  endsAt?: string
}

interface Firing {
  alert: Alert
  timer: NodeJS.Timeout
  /** The key of this alert's posts in `tails`; a new alert of the same key (a re-fire) shares it. */
  tail: string
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
  /** Escalation alerts, by the incident's version and trigger (`operator` for an operator's). */
  private readonly escalated = new Map<string, Firing>()
  /**
   * The last post of each alert still on its way, by `Firing.tail`: the next post of that alert
   * goes after it. Two posts of one alert in flight at once could reach Alertmanager out of
   * order, and a firing post that lands after the resolved one makes the alert active again
   * until `resolve_timeout`.
   */
  private readonly tails = new Map<string, Promise<string[]>>()
  /** The next attempt at a resolution not taken yet, by `Firing.tail`: a new alert of that key cancels it. */
  private readonly resolving = new Map<string, NodeJS.Timeout>()
  /** The Alertmanagers in a failure streak (each logged once per streak: one down beside one up is not news at every post). */
  private readonly failing = new Set<string>()
  private stopped = false

  constructor (private readonly config: () => NotificationsConfig, private readonly logger: Logger) {}

  /**
   * Fire on `trigger_fired`, escalate on `escalated`, resolve both on `restoration_verified`;
   * other events are not alerts.
   */
  handle (event: NotificationEvent): void {
    if (this.config().alertmanager === null) return
    if (event.kind === 'escalated') this.escalate(event)
    else if (event.kind === 'restoration_verified') this.endEscalation(event)
    if (event.trigger === null) return
    if (event.kind === 'trigger_fired') this.fire(event)
    else if (event.kind === 'restoration_verified') this.resolve(event.trigger)
  }

  private escalate (event: NotificationEvent): void {
    const am = this.config().alertmanager
    if (am === null) return
    const key = escalationKey(event)
    const existing = this.escalated.get(key)
    if (existing !== undefined) clearInterval(existing.timer)
    const trigger = event.trigger ?? 'operator'
    const alert: Alert = {
      labels: { ...am.labels, alertname: 'BreakwaterIncidentEscalated', service: event.service, trigger, version: event.version, severity: 'critical' },
      annotations: {
        summary: `${event.service}: incident ${String(event.details.incident ?? '')} escalated (${event.trigger === null ? 'operator' : `trigger ${trigger}`})`,
        description: event.summary,
        runbook: this.runbook,
        incident: String(event.details.incident ?? ''),
        instance: this.instance
      },
      startsAt: existing?.alert.startsAt ?? event.time
    }
    this.repeat(this.escalated, key, alert)
  }

  /**
   * After a restart: post again the escalation of an incident escalated before it and not yet
   * verified restored, and re-post it as before. `event.time`, when it escalated, is `startsAt`.
   */
  resumeEscalation (event: NotificationEvent): void {
    if (this.config().alertmanager === null) return
    this.escalate(event)
  }

  /**
   * Stop re-posting the escalation of `version`'s `trigger` without resolving it: the fleet's
   * leader acts for the incident now and posts the same alert (it has no `instance` label).
   */
  dropEscalation (version: string, trigger: string | null): void {
    const key = escalationKey({ version, trigger })
    const f = this.escalated.get(key)
    if (f === undefined) return
    clearInterval(f.timer)
    this.escalated.delete(key)
  }

  /** Restoration verified: the escalation of that incident (its version and trigger) ends. */
  private endEscalation (event: NotificationEvent): void {
    this.end(this.escalated, escalationKey(event))
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
    this.repeat(this.firing, trigger, alert)
  }

  /** Post `alert` now and every `repeatInterval` until it is resolved. */
  private repeat (into: Map<string, Firing>, key: string, alert: Alert): void {
    const am = this.config().alertmanager
    if (am === null) return
    const tail = `${into === this.firing ? 'trigger' : 'escalation'}\u0000${key}`
    clearTimeout(this.resolving.get(tail))
    this.resolving.delete(tail)
    const firing: Firing = { alert, timer: setInterval(() => { this.postAfter(firing, alert) }, am.repeatIntervalMs), tail }
    firing.timer.unref()
    into.set(key, firing)
    this.postAfter(firing, alert)
  }

  /** The incident of `trigger` is over here: resolve its alert (no-op when none fires). */
  resolve (trigger: string): void {
    this.end(this.firing, trigger)
  }

  /** Stop re-posting the alert held under `key` and post it once more, resolved (`endsAt` now). */
  private end (from: Map<string, Firing>, key: string): void {
    const f = from.get(key)
    if (f === undefined) return
    clearInterval(f.timer)
    from.delete(key)
    this.resolveAt(f, { ...f.alert, endsAt: new Date().toISOString() }, undefined, Date.now() + RESOLVE_RETRY_MS)
  }

  /** Post the resolved `alert` (to `urls`, else every one), and again to those that did not take it, until `until`. */
  private resolveAt (f: Firing, alert: Alert, urls: string[] | undefined, until: number): void {
    void this.postAfter(f, alert, urls).then((failed) => {
      const am = this.config().alertmanager
      // Fired again meanwhile (`repeat` also cancels a pending attempt): the newer alert stands.
      const firesAgain = [...this.firing.values(), ...this.escalated.values()].some((x) => x.tail === f.tail)
      // Only to the Alertmanagers still configured (a reload may have changed them).
      const again = am === null ? [] : failed.filter((url) => am.urls.includes(url))
      if (am === null || again.length === 0 || firesAgain || this.stopped || Date.now() >= until) return
      const timer = setTimeout(() => { this.resolving.delete(f.tail); this.resolveAt(f, alert, again, until) }, am.repeatIntervalMs)
      timer.unref()
      this.resolving.set(f.tail, timer)
    })
  }

  /**
   * Post `alert` (to `urls`, else every one) once the previous post of the same alert has
   * settled; resolves with the URLs that did not take it (`post` never rejects).
   */
  private postAfter (f: Firing, alert: Alert, urls?: string[]): Promise<string[]> {
    const last = (this.tails.get(f.tail) ?? Promise.resolve([])).then(async () => await this.post(alert, urls))
    this.tails.set(f.tail, last)
    void last.then(() => { if (this.tails.get(f.tail) === last) this.tails.delete(f.tail) })
    return last
  }

  private async post (alert: Alert, urls?: string[]): Promise<string[]> {
    const am = this.config().alertmanager
    if (am === null) return []
    const failed: string[] = []
    await Promise.all((urls ?? am.urls).map(async (url) => {
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
        if (this.failing.delete(url)) this.logger.info({ event: 'notification', channel: 'alertmanager', alertmanager: hostOf(url) }, 'Alertmanager reachable again')
      } catch (err) {
        this.failed++
        failed.push(url)
        if (!this.failing.has(url)) this.logger.warn({ event: 'notification_failed', channel: 'alertmanager', alertmanager: hostOf(url), failure: (err as { code?: string }).code ?? (err as Error).message }, 'alert not posted to Alertmanager; the next repeat retries')
        this.failing.add(url)
      }
    }))
    return failed
  }

  stop (): void {
    this.stopped = true
    for (const timer of this.resolving.values()) clearTimeout(timer)
    this.resolving.clear()
    for (const f of [...this.firing.values(), ...this.escalated.values()]) clearInterval(f.timer)
    this.firing.clear()
    this.escalated.clear()
  }
}

/** An Alertmanager as its log lines name it: host and port, never credentials in its URL. */
function hostOf (url: string): string {
  try { return new URL(url).host } catch { return 'unknown' }
}

function escalationKey (event: Pick<NotificationEvent, 'version' | 'trigger'>): string {
  return `${event.version}\u0000${event.trigger ?? 'operator'}`
}
