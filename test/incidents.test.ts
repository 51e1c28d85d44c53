/**
 * Incidents end to end (SPEC §19): escalation (once, at `escalateAfter`, at once on a failed
 * verification, never when restored in time, across a restart), the status page lifecycle on
 * one page incident (create, then PATCH by its id, across a restart), and the post-mortem draft
 * (sections, figures against the audit log, after a restart, through the CLI). Real receivers for
 * PagerDuty, Slack, Statuspage and webhooks on loopback; real sidecars; real traffic.
 */
import t, { type Test } from 'tap'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { resolveConfig } from '../src/config/load.js'
import { startApp, type App } from './helpers/app.js'
import { startCaptured, startTestSidecar, testSidecarInput, TEST_TOKEN, type TestSidecar } from './helpers/sidecar.js'
import { startUpstream } from './helpers/upstream.js'
import { startReceiver, type Receiver, type Delivery } from './helpers/receiver.js'
import { startStatusPage, type StatusPage } from './helpers/status-page.js'
import { admin } from './helpers/admin.js'
import { furtherPage, StatusPageLifecycle, type PageIncidentState, type SendPageRequest } from '../src/control/status-page.js'
import type { NotificationsConfig } from '../src/config/types.js'
import pino from 'pino'
import { sleep, eventually } from './helpers/http.js'
import { traffic, type Traffic } from './helpers/traffic.js'
import { runCli, tempDir } from './helpers/process.js'

t.setTimeout(180_000)

interface Receivers {
  pd: Receiver
  slack: Receiver
  sp: Receiver
  hook: Receiver
}

/** PagerDuty, Slack, a Statuspage that answers a create with an incident id, a webhook. */
async function receivers (t: Test): Promise<Receivers> {
  const [pd, slack, sp, hook] = await Promise.all([startReceiver([202]), startReceiver([200]), startReceiver([201, 200]), startReceiver([200])])
  let created = 0
  sp.answer = (d) => d.method === 'POST' ? { id: `sp-incident-${++created}`, status: d.body?.incident?.status } : { id: d.url.split('/').at(-1) }
  for (const r of [pd, slack, sp, hook]) t.teardown(r.close)
  return { pd, slack, sp, hook }
}

const TRIGGER = { name: 'checkout-errors', metric: 'error_rate', threshold: 0.5, window: '10s', minRequests: 5, action: 'killSwitch', flags: ['newCheckout'], route: 'checkout' }

interface Options {
  notifications?: Record<string, unknown>
  trigger?: Record<string, unknown>
  verification?: Record<string, unknown>
  stateDir?: string
  /** false: no pagerDutyEscalationRoutingKey. */
  escalationKey?: false
  rollback?: Record<string, unknown>
}

/** The shop behind a sidecar: `checkout` (kill switch `newCheckout`) and `catalog`, every channel configured. */
async function shop (t: Test, app: App, r: Receivers, o: Options = {}): Promise<{ s: TestSidecar, load: Traffic }> {
  const stateDir = o.stateDir ?? mkdtempSync(join(tmpdir(), 'breakwater-incidents-'))
  const { config } = resolveConfig(testSidecarInput({
    service: 'shop',
    version: '3.1.0',
    upstreams: { app: { url: app.url, critical: true } },
    routes: [
      { name: 'checkout', match: { pathPrefix: '/checkout' }, upstream: 'app', killSwitch: 'newCheckout' },
      { name: 'catalog', match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    featureFlags: { newCheckout: true, unrelated: true },
    rollbackTriggers: [{ ...TRIGGER, ...o.trigger }],
    ...(o.rollback !== undefined ? { rollback: o.rollback } : {}),
    notifications: {
      slackChannel: '#incidents',
      slackWebhookUrl: `${r.slack.url}/slack`,
      pagerDutyRoutingKey: 'rk-main',
      ...(o.escalationKey === false ? {} : { pagerDutyEscalationRoutingKey: 'rk-escalation' }),
      pagerDutyUrl: `${r.pd.url}/v2/enqueue`,
      statusPageId: 'page1',
      statusPageApiKey: 'sp-key',
      statusPageUrl: r.sp.url,
      webhooks: [`${r.hook.url}/events`],
      ...o.notifications
    },
    verification: { intervalMs: 150, successes: 2, windowMs: '2s', timeoutMs: '15s', ...o.verification },
    logging: { level: 'info', accessLog: false }
  }, stateDir))
  const s = await startCaptured(t, config, stateDir)
  const load = traffic(s.proxy)
  t.teardown(load.close)
  return { s, load }
}

async function incidents (s: TestSidecar): Promise<any[]> {
  const r = await admin(s.admin, 'GET', '/v1/incidents')
  return r.body.incidents as any[]
}

/** Fail checkout `n` times and evaluate the triggers at once. */
async function breakCheckout (app: App, s: TestSidecar, load: Traffic, n = 20): Promise<void> {
  app.failing.add('/checkout')
  const statuses = await load.burst('/checkout/cart', n)
  // On a busy host the burst can outlast the sidecar's own trigger tick: the kill switch (or the
  // breaker) then answers the rest with 503, which is the sidecar doing its job.
  const failed = statuses.indexOf(503) === -1 ? statuses : statuses.slice(0, statuses.indexOf(503))
  const refused = statuses.slice(failed.length)
  if (failed.length < 5 || !failed.every((c) => c === 500) || !refused.every((c) => c === 503)) throw new Error(`checkout did not fail: ${statuses.join(',')}`)
  s.sidecar.triggers.evaluate()
}

/** Real users on the catalog until the returned function is awaited. */
function users (load: Traffic): () => Promise<void> {
  let flowing = true
  const run = (async () => { while (flowing) { await load.burst('/catalog/items', 3); await sleep(100) } })()
  return async () => { flowing = false; await run }
}

async function settled (s: TestSidecar, id: string): Promise<any> {
  let last: any
  await eventually(async () => {
    last = (await incidents(s)).find((i) => i.id === id)
    return last !== undefined && last.status !== 'verifying' && last.status !== 'detected'
  }, 30_000, 100)
  return last
}

/** Checkout breaks, the trigger's kill switch fires, users of the catalog verify it: the settled incident. */
async function restoredByTrigger (t: Test, app: App, s: TestSidecar, load: Traffic): Promise<any> {
  await breakCheckout(app, s, load)
  const stop = users(load)
  t.teardown(stop)
  const [first] = await incidents(s)
  const i = await settled(s, first.id)
  await stop()
  return i
}

const escalations = (r: Receivers): { pd: Delivery[], slack: Delivery[], hook: Delivery[] } => ({
  pd: r.pd.deliveries.filter((d) => d.body?.payload?.severity === 'critical' && d.body.event_action === 'trigger'),
  slack: r.slack.deliveries.filter((d) => /ESCALATED/.test(String(d.body?.text))),
  hook: r.hook.deliveries.filter((d) => d.body?.event === 'escalated')
})

async function until (ms: number): Promise<void> {
  await eventually(() => Date.now() >= ms, Math.max(0, ms - Date.now()) + 60_000, 50)
}

async function auditOf (s: TestSidecar): Promise<any[]> {
  return (await admin(s.admin, 'GET', '/v1/audit?limit=1000')).body.entries as any[]
}

t.test('escalation: an incident not verified restored within escalateAfter is escalated once — PagerDuty critical to the escalation key, Slack, webhooks', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  const { s, load } = await shop(t, app, r, { notifications: { escalateAfter: '1s' }, trigger: { action: 'notify' } })
  await breakCheckout(app, s, load)
  const [i] = await incidents(s)
  t.equal(i.status, 'detected', 'a trigger that only notifies leaves the incident open')
  t.equal(Date.parse(i.escalateAt) - Date.parse(i.detectedAt), 1000, 'escalateAt = detection + escalateAfter')
  // Read after the deadline on a busy machine, it may be escalated already: never before it.
  t.ok(i.escalatedAt === null || Date.parse(i.escalatedAt) >= Date.parse(i.escalateAt), 'not escalated before its deadline')

  t.ok(await eventually(() => escalations(r).pd.length === 1 && escalations(r).slack.length === 1 && escalations(r).hook.length === 1, 30_000), 'escalated on every channel')
  const first = r.pd.deliveries.find((d) => d.body.event_action === 'trigger' && d.body.payload.severity === 'error')
  t.match(first?.body, { routing_key: 'rk-main', event_action: 'trigger' }, 'detection opened the alert at error on the routing key')
  const pd = escalations(r).pd[0] as Delivery
  t.match(pd.body, { routing_key: 'rk-escalation', event_action: 'trigger', dedup_key: first?.body.dedup_key, payload: { severity: 'critical', summary: /ESCALATED/ } }, 'critical, to the escalation key, same dedup_key')
  t.ok(pd.at >= Date.parse(i.escalateAt), 'not before the deadline')
  t.match(escalations(r).slack[0]?.body, { channel: '#incidents', text: /ESCALATED/ })
  t.match(escalations(r).hook[0]?.body, { event: 'escalated', trigger: 'checkout-errors', details: { incident: i.id, escalated: true } })
  const [after] = await incidents(s)
  t.ok(after.escalatedAt !== null && Date.parse(after.escalatedAt) >= Date.parse(i.escalateAt), 'the record says when')
  t.match(after.escalationReason, /not verified restored within 1 s/)

  // The trigger fires again and time passes: still once per incident.
  await load.burst('/checkout/cart', 10)
  s.sidecar.triggers.evaluate()
  await until(Date.parse(after.escalatedAt) + 2500)
  t.equal(escalations(r).pd.length, 1, 'PagerDuty escalation sent once')
  t.equal(escalations(r).slack.length, 1)
  t.equal(escalations(r).hook.length, 1)
  // The audit line is appended after the escalation is sent: wait for it, then count.
  t.ok(await eventually(async () => (await auditOf(s)).some((e) => e.action === 'incident.escalated' && e.targets.includes(i.id)), 15_000), 'audited')
  t.equal((await auditOf(s)).filter((e) => e.action === 'incident.escalated' && e.targets.includes(i.id)).length, 1, 'audited once')
  t.ok(s.logs.some((l) => l.event === 'incident' && l.phase === 'escalated' && l.incident === i.id), 'logged')
})

t.test('an incident nobody mitigated ends when its signal clears: restoration verified on real traffic, PagerDuty and the page incident resolved, never escalated', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  const { s, load } = await shop(t, app, r, { trigger: { action: 'notify', window: '2s' } })
  await breakCheckout(app, s, load)
  const [i] = await incidents(s)
  t.match(i, { status: 'detected', mitigation: null }, 'the trigger only notified')
  t.ok(await eventually(() => r.sp.deliveries.length === 1, 15_000), 'the page incident was created')

  // The release recovers by itself: checkout answers again, and its trigger re-arms on that traffic.
  app.failing.delete('/checkout')
  let flowing = true
  const checkout = (async () => { while (flowing) { await load.burst('/checkout/cart', 3); await sleep(100) } })()
  t.teardown(async () => { flowing = false; await checkout })
  const settledIncident = await settled(s, i.id)
  flowing = false
  await checkout
  t.equal(settledIncident.status, 'restored', 'restored')
  t.type(settledIncident.clearedAt, 'string', 'verified from the moment the signal cleared')
  t.equal(settledIncident.mitigation, null, 'with no mitigation')
  t.equal(settledIncident.mitigatedAt, null, 'and no time to mitigate')
  t.ok(settledIncident.timeToRestoreSeconds > 0, 'a time to restore')
  t.ok(s.logs.some((l) => l.event === 'trigger_rearmed') && s.logs.some((l) => l.event === 'incident' && l.phase === 'cleared' && l.incident === i.id), 'the re-armed trigger and the cleared signal are logged')

  t.ok(await eventually(() => r.pd.deliveries.some((d) => d.body.event_action === 'resolve'), 15_000), 'PagerDuty resolved')
  t.same(r.pd.deliveries.map((d) => d.body.event_action), ['trigger', 'resolve'], 'opened at detection, resolved once restored')
  t.ok(await eventually(() => r.sp.deliveries.length === 3, 15_000), 'the page incident resolved')
  t.same(r.sp.deliveries.map((d) => [d.method, d.body.incident.status]), [['POST', 'investigating'], ['PATCH', 'monitoring'], ['PATCH', 'resolved']], 'investigating, monitoring while verifying, resolved')
  t.ok(await eventually(() => r.hook.deliveries.some((d) => d.body?.event === 'restoration_verified'), 15_000), 'restoration_verified sent to the webhooks')
  t.match(r.hook.deliveries.find((d) => d.body?.event === 'restoration_verified')?.body.summary, /with no mitigation: the signal cleared/, 'the notice says what restored it')
  t.same(escalations(r), { pd: [], slack: [], hook: [] }, 'never escalated')
  t.equal(s.sidecar.verifier.armedEscalations, 0, 'no escalation armed once restored')
  t.ok(await eventually(async () => (await auditOf(s)).some((e) => e.action === 'incident.cleared' && e.targets.includes(i.id)), 15_000), 'audited (the line is appended after the record changes)')
  const report = await admin(s.admin, 'GET', `/v1/incidents/${i.id}/report?format=json`)
  t.ok(report.body.timeline.some((e: any) => /re-armed with no mitigation/.test(e.what)), 'the report\'s timeline holds it')
})

t.test('a rollback that fails after its trigger re-armed: the incident escalates for the failed rollback, then ends on the traffic', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  // The rollback webhook answers 500, but only after the release has recovered and the trigger re-armed.
  const cd = await startReceiver([500])
  cd.delayMs = 60_000
  t.teardown(cd.close)
  const { s, load } = await shop(t, app, r, { trigger: { action: 'rollback', window: '2s' }, rollback: { type: 'webhook', url: `${cd.url}/rollback`, retries: 0, timeoutMs: '2m' } })
  await breakCheckout(app, s, load)
  t.ok(await eventually(() => cd.deliveries.length === 1, 15_000), 'the rollback was called')
  app.failing.delete('/checkout')
  let flowing = true
  const checkout = (async () => { while (flowing) { await load.burst('/checkout/cart', 3); await sleep(100) } })()
  t.teardown(async () => { flowing = false; await checkout })
  t.ok(await eventually(() => s.sidecar.triggers.status().find((x) => x.name === TRIGGER.name)?.state === 'ok', 30_000), 'the trigger re-armed while the rollback ran')
  const [running] = await incidents(s)
  t.match(running, { status: 'detected', mitigation: { action: 'rollback', status: 'running' } }, 'nothing to verify yet: the rollback is running')

  cd.delayMs = 0
  cd.release()
  const settledIncident = await settled(s, running.id)
  t.match(settledIncident, { status: 'restored', mitigation: { action: 'rollback', status: 'failed' } }, 'restored, its rollback failed')
  t.type(settledIncident.clearedAt, 'string', 'verified from when the rollback failed, its signal long cleared')
  t.ok(await eventually(() => escalations(r).hook.length === 1, 15_000), 'the failed rollback escalated it')
  t.ok(await eventually(() => r.hook.deliveries.some((d) => d.body?.event === 'restoration_verified'), 15_000), 'then restoration was verified')
  t.match(r.hook.deliveries.find((d) => d.body?.event === 'restoration_verified')?.body.summary, /no mitigation in force \(the rollback \S+ failed\): the signal cleared/, 'the notice says what restored it')
})

t.test('a mitigation judged not restored: once its trigger re-arms, restoration is verified again and the escalated page, status page and notices are resolved', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  // The trigger kills the wrong flag: checkout keeps failing, verification says not restored.
  const { s, load } = await shop(t, app, r, { notifications: { escalateAfter: '1h' }, trigger: { flags: ['unrelated'], window: '2s' }, verification: { timeoutMs: '2s' } })
  let flowing = true
  const checkout = (async () => { while (flowing) { await load.burst('/checkout/cart', 3); await sleep(100) } })()
  t.teardown(async () => { flowing = false; await checkout })
  await breakCheckout(app, s, load)
  const [first] = await incidents(s)
  const failed = await settled(s, first.id)
  t.equal(failed.status, 'not_restored', 'the wrong kill switch did not restore service')
  t.ok(await eventually(() => escalations(r).pd.length === 1, 15_000), 'escalated at once')

  // The release recovers by itself: checkout answers again, and the trigger re-arms on that traffic.
  app.failing.delete('/checkout')
  const ended = await eventually(async () => (await incidents(s)).find((i) => i.id === first.id)?.status === 'restored', 30_000, 100)
  flowing = false
  await checkout
  const [i] = await incidents(s)
  t.ok(ended, `restored once its signal cleared (status ${String(i.status)})`)
  t.equal(i.id, first.id, 'the same incident, not a new one')
  t.type(i.clearedAt, 'string', 'verified from the moment the signal cleared')
  t.ok(await eventually(() => r.pd.deliveries.filter((d) => d.body.event_action === 'resolve').length === 2, 15_000), 'PagerDuty resolved')
  t.same(r.pd.deliveries.filter((d) => d.body.event_action === 'resolve').map((d) => d.body.routing_key).sort(), ['rk-escalation', 'rk-main'], 'on both routing keys: it had been escalated')
  t.ok(await eventually(() => r.sp.deliveries.some((d) => d.body?.incident?.status === 'resolved'), 15_000), 'the page incident resolved')
  // Monitoring is while verifying (SPEC §19): the failed verification sent the page back to identified.
  t.same(r.sp.deliveries.map((d) => d.body.incident.status), ['investigating', 'identified', 'monitoring', 'identified', 'monitoring', 'resolved'], 'back to identified when the fix did not restore service, then monitoring and resolved')
  t.same(new Set(r.sp.deliveries.map((d) => d.headers['idempotency-key'])).size, 6, 'each update with its own idempotency key')
  t.ok(await eventually(() => r.hook.deliveries.some((d) => d.body?.event === 'restoration_verified'), 15_000), 'restoration_verified sent')
  t.match(r.hook.deliveries.find((d) => d.body?.event === 'restoration_verified')?.body.summary, /signal cleared \(the killSwitch \S+ had not restored service\)/, 'the notice says what happened')
  t.equal(escalations(r).pd.length, 1, 'escalated once')
  t.ok(i.impact.countedUntil * 1000 >= Date.parse(i.clearedAt) - 1000, 'the impact is counted past the failed verification')
})

t.test('a kill switch that refuses its trigger\'s whole scope, lifted with the fault still there: the trigger fires again, a new incident is announced', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  const { s, load } = await shop(t, app, r, { trigger: { window: '2s' } })
  const first = await restoredByTrigger(t, app, s, load)
  t.equal(first.status, 'restored', 'the kill switch restored the service (judged on the catalog)')
  // While checkout is refused its trigger's window records nothing: after a whole window of it,
  // nothing of the failures that fired it is left to judge by.
  await eventually(() => s.sidecar.triggers.status().find((x) => x.name === TRIGGER.name)?.state !== 'fired', 10_000, 100)
  t.equal((await admin(s.admin, 'DELETE', '/v1/flags/newCheckout', { reason: 'looks fixed' })).status, 200)
  // It was not: checkout fails again.
  t.ok(await eventually(async () => {
    await breakCheckout(app, s, load, 10)
    return (await incidents(s)).length === 2
  }, 15_000, 200), 'a new incident for the failure that came back')
  const [second] = await incidents(s)
  t.not(second.id, first.id)
  t.equal(second.trigger, TRIGGER.name)
  t.ok(await eventually(() => r.pd.deliveries.filter((d) => d.body.event_action === 'trigger').length === 2, 15_000), 'PagerDuty paged again')
  t.ok(await eventually(() => r.hook.deliveries.filter((d) => d.body?.event === 'trigger_fired').length === 2, 15_000), 'trigger_fired sent again')
  t.ok(s.logs.some((l) => l.event === 'trigger_rearmed' && l.inconclusive === true), 'the re-arming on too little data is logged')
})

t.test('an incident restored in time never escalates: the deadline is disarmed and the PagerDuty alert resolved', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  const { s, load } = await shop(t, app, r, { notifications: { escalateAfter: '10s' } })
  const i = await restoredByTrigger(t, app, s, load)
  t.equal(i.status, 'restored')
  t.equal(s.sidecar.verifier.armedEscalations, 0, 'no escalation armed once restored')
  await until(Date.parse(i.escalateAt) + 1500)
  t.same(escalations(r), { pd: [], slack: [], hook: [] }, 'never escalated')
  t.equal((await incidents(s)).find((x) => x.id === i.id).escalatedAt, null)
  t.ok(await eventually(() => r.pd.deliveries.some((d) => d.body.event_action === 'resolve')), 'resolved')
  t.same(r.pd.deliveries.map((d) => [d.body.event_action, d.body.routing_key]), [['trigger', 'rk-main'], ['resolve', 'rk-main']], 'an incident never escalated is resolved on the routing key only')
  // Eleven facts: Slack takes ten fields a section, so the eleventh opens a second one.
  const restored = r.slack.deliveries.find((d) => /restored \(verified\)/.test(String(d.body?.text)))
  const fields = (restored?.body.blocks as Array<{ fields?: Array<{ text: string }> }>).flatMap((b) => b.fields ?? [])
  t.ok(fields.length > 10 && fields.some((f) => f.text === `*escalateAt*: ${String(i.escalateAt)}`), 'the Slack message of the restoration carries every fact, its deadline too')
  t.ok((restored?.body.blocks as Array<{ fields?: unknown[] }>).every((b) => (b.fields?.length ?? 0) <= 10), 'at most ten fields a section')
})

t.test('a failed verification escalates at once, whatever escalateAfter; once', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  const { s, load } = await shop(t, app, r, { notifications: { escalateAfter: '1h' }, trigger: { minRequests: 1000 }, verification: { timeoutMs: '2s', synthetics: [{ route: 'checkout', path: '/checkout/probe' }] } })
  app.failing.add('/checkout')
  await load.burst('/checkout/cart', 20)
  // The wrong flag: checkout keeps failing.
  const m = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'killSwitch', flags: ['unrelated'], reason: 'wrong guess' })
  t.equal(m.status, 201)
  const [first] = await incidents(s)
  const i = await settled(s, first.id)
  t.equal(i.status, 'not_restored')
  t.ok(await eventually(() => escalations(r).pd.length === 1 && escalations(r).hook.length === 1, 15_000), 'escalated')
  const [now] = await incidents(s)
  t.ok(Date.parse(now.escalatedAt) >= Date.parse(now.endedAt), 'when verification failed')
  t.ok(Date.parse(now.escalatedAt) < Date.parse(now.escalateAt), 'long before the escalateAfter deadline')
  t.match(now.escalationReason, /verification failed/)
  t.match(escalations(r).pd[0]?.body, { routing_key: 'rk-escalation', payload: { severity: 'critical', class: 'operator' } }, "an operator's incident reaches PagerDuty when escalated")
  await sleep(1000)
  t.equal(escalations(r).pd.length, 1, 'once')
  t.equal(escalations(r).slack.length, 1)
  t.equal(s.sidecar.verifier.armedEscalations, 0)
  // The probes failed on checkout too, and the windows counted them: the impact leaves them out.
  // It counts whole seconds from the incident's: the 20 real requests are in it when they fell
  // in its first second (not always), the probes of the last, partial second never are.
  const report = (await admin(s.admin, 'GET', `/v1/incidents/${i.id}/report?format=json`)).body
  t.ok(report.impact.requests <= 20 && report.impact.requestsFailed === report.impact.requests, `no probe among the real requests (${String(report.impact.requests)} counted)`)
  t.ok(report.impact.probesExcluded >= 1 && report.impact.probesExcluded <= now.checks.syntheticRounds, `probes excluded: ${String(report.impact.probesExcluded)} of ${String(now.checks.syntheticRounds)}`)
})

t.test('after a restart, a trigger that fires again into its still-open incident does not announce it again', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  const stateDir = mkdtempSync(join(tmpdir(), 'breakwater-incidents-'))
  // A trigger that only notifies: nothing mitigates, so checkout still fails after the restart.
  const options = { stateDir, trigger: { action: 'notify' }, notifications: { escalateAfter: '10m' } }
  const a = await shop(t, app, r, options)
  await breakCheckout(app, a.s, a.load)
  const fired = (): { hook: number, slack: number, pd: number } => ({
    hook: r.hook.deliveries.filter((d) => d.body.event === 'trigger_fired').length,
    slack: r.slack.deliveries.length,
    pd: r.pd.deliveries.filter((d) => d.body.event_action === 'trigger').length
  })
  t.ok(await eventually(() => fired().hook === 1 && fired().slack === 1 && fired().pd === 1 && r.sp.deliveries.length === 1, 15_000), 'announced once: webhook, Slack, PagerDuty, the page incident')
  const [before] = await incidents(a.s)
  await a.load.close()
  await a.s.sidecar.close()

  const b = await shop(t, app, r, options)
  t.match((await incidents(b.s))[0], { id: before.id, status: 'detected' }, 'the incident is still open after the restart')
  await breakCheckout(app, b.s, b.load)
  t.ok(await eventually(async () => (await auditOf(b.s)).some((e) => e.action === 'trigger.refire'), 15_000), 'the firing again is audited')
  const refire = (await auditOf(b.s)).find((e) => e.action === 'trigger.refire')
  t.match(refire, { targets: ['checkout-errors'], result: new RegExp(`incident ${before.id as string} still open`) })
  t.equal((await incidents(b.s)).length, 1, 'no second incident')
  t.same(fired(), { hook: 1, slack: 1, pd: 1 }, 'not announced again on any channel')
  t.equal(r.sp.deliveries.length, 1, 'the page incident is not set back to investigating')
})

t.test('status page: create → identified → monitoring → resolved on one page incident, across a restart mid-incident; the report after the restart', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  const stateDir = mkdtempSync(join(tmpdir(), 'breakwater-incidents-'))
  const a = await shop(t, app, r, { stateDir, verification: { timeoutMs: '60s' } })
  await breakCheckout(app, a.s, a.load)
  // The kill switch refuses checkout; nobody uses the catalog: verification keeps going.
  t.ok(await eventually(() => r.sp.deliveries.length === 3, 15_000), 'created, identified, monitoring')
  const [before] = await incidents(a.s)
  t.equal(before.status, 'verifying')
  await a.load.close()
  await a.s.sidecar.close()
  // Down for a while: the traffic of that span is held by nobody.
  await sleep(1100)

  const b = await shop(t, app, r, { stateDir, verification: { timeoutMs: '60s' } })
  const [resumed] = await incidents(b.s)
  t.match(resumed, { id: before.id, status: 'verifying', escalateAt: before.escalateAt }, 'the open incident survived the restart')
  const stop = users(b.load)
  t.teardown(stop)
  const i = await settled(b.s, before.id)
  await stop()
  t.equal(i.status, 'restored', 'verified restored by the new process')
  t.ok(await eventually(() => r.sp.deliveries.length === 4, 15_000), 'resolved')
  t.same(r.sp.deliveries.map((d) => [d.method, d.url, d.body.incident.status]), [
    ['POST', '/v1/pages/page1/incidents', 'investigating'],
    ['PATCH', '/v1/pages/page1/incidents/sp-incident-1', 'identified'],
    ['PATCH', '/v1/pages/page1/incidents/sp-incident-1', 'monitoring'],
    ['PATCH', '/v1/pages/page1/incidents/sp-incident-1', 'resolved']
  ], 'one create; every update by the id the page gave, the last one from the restarted sidecar')
  t.match(r.sp.deliveries[0]?.body.incident, { name: /shop/, body: /checkout-errors/, impact_override: 'major' })
  t.equal(r.sp.deliveries[0]?.headers.authorization, 'OAuth sp-key')

  const report = await admin(b.s.admin, 'GET', `/v1/incidents/${i.id}/report?format=json`)
  t.equal(report.status, 200, 'the report after a restart')
  t.match(report.body, { incident: i.id, status: 'restored', times: { timeToRestoreSeconds: i.timeToRestoreSeconds } })
  t.equal(report.body.impact.gaps.length, 1, 'the restart is a gap in the figures')
  t.ok(report.body.notHeld.some((n: string) => /restarted/.test(n)), 'and the report says so')
  t.ok(report.body.timeline.some((e: any) => /mitigation\.killSwitch/.test(e.what) && e.by === 'trigger checkout-errors'), "the first process's kill switch is in the timeline (audit log in stateDir)")
  t.ok(report.body.openQuestions.some((q: string) => /restarted/.test(q)))
})

t.test('a resolve for a page incident never created is not sent by guess: logged and counted', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  r.sp.respond = [500]
  const { s, load } = await shop(t, app, r, { notifications: { maxAttempts: 1 } })
  const i = await restoredByTrigger(t, app, s, load)
  t.equal(i.status, 'restored')
  t.ok(await eventually(() => s.logs.some((l) => l.event === 'statuspage_unknown_incident')), 'logged')
  t.ok(await eventually(() => s.sidecar.notifier.pending === 0))
  t.notOk(r.sp.deliveries.some((d) => d.method === 'PATCH'), 'no PATCH of an id we do not have')
  t.notOk(r.sp.deliveries.some((d) => d.body?.incident?.status === 'resolved'), 'no create-then-resolve')
  t.ok((s.sidecar.notifier.failed.get('statuspage') ?? 0) >= 2, 'counted as failed status page notifications')
})

/** The Statuspage keeping the incidents, closed when `t` ends. */
async function statusPage (t: Test): Promise<StatusPage> {
  const page = await startStatusPage()
  t.teardown(page.close)
  return page
}

const RANKED = ['investigating', 'identified', 'monitoring', 'resolved']

/** The page's one incident went forward only, from investigating to resolved. */
function forwardToResolved (t: Test, page: StatusPage): void {
  const [only, ...others] = [...page.incidents.values()]
  t.equal(others.length, 0, `one page incident (${page.incidents.size})`)
  const ranks = (only?.statuses ?? []).map((s) => RANKED.indexOf(s))
  t.same([only?.statuses[0], only?.statuses.at(-1)], ['investigating', 'resolved'], `created investigating, ended resolved: ${only?.statuses.join(' → ') ?? 'none'}`)
  t.ok(ranks.every((r, i) => i === 0 || r > (ranks[i - 1] as number)), 'never backwards, never twice')
}

t.test('a create the page made but answered with an error is looked for before it is retried: one page incident, updated through resolved', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  const page = await statusPage(t)
  page.failAfterCreate = 1
  const { s, load } = await shop(t, app, r, { notifications: { statusPageUrl: page.url } })
  await breakCheckout(app, s, load)
  t.ok(await eventually(() => s.sidecar.notifier.statusPage.retrying === 1 && s.sidecar.notifier.pending >= 1), 'the create waiting for its retry is a pending notification')
  const stop = users(load)
  t.teardown(stop)
  const [first] = await incidents(s)
  const i = await settled(s, first.id)
  await stop()
  t.equal(i.status, 'restored', 'verified restored')
  t.ok(await eventually(() => [...page.incidents.values()].some((p) => p.status === 'resolved'), 15_000), 'resolved on the page')
  forwardToResolved(t, page)
  const calls = page.deliveries.map((d) => `${d.method} ${d.url}`)
  t.equal(calls.filter((c) => c.startsWith('POST')).length, 1, 'created once: the retry found it')
  t.equal(calls[1], 'GET /v1/pages/page1/incidents/unresolved?per_page=100', 'the retry first looked for it among the unresolved incidents')
  t.ok(calls.slice(2).every((c) => c === 'PATCH /v1/pages/page1/incidents/sp-incident-1'), 'then updated it by its id')
  t.ok(s.logs.some((l) => l.event === 'statuspage_incident_found' && l.id === 'sp-incident-1'), 'logged as found')
  t.equal(s.sidecar.notifier.failed.get('statuspage') ?? 0, 0, 'no status page notification counted failed: the create was retried, not given up')
})

t.test('a sidecar stopped while its create is in flight looks for that page incident after the restart, and resolves it instead of leaving it open', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  const page = await statusPage(t)
  page.holdCreates = true
  const stateDir = mkdtempSync(join(tmpdir(), 'breakwater-incidents-'))
  const options = { stateDir, notifications: { statusPageUrl: page.url }, verification: { timeoutMs: '60s' } }
  const a = await shop(t, app, r, options)
  await breakCheckout(app, a.s, a.load)
  // The page made the incident; its answer (and the id) never reaches this sidecar.
  t.ok(await eventually(() => page.incidents.size === 1, 15_000), 'the create reached the page')
  await a.load.close()
  await a.s.sidecar.close()
  page.holdCreates = false

  const b = await shop(t, app, r, options)
  const stop = users(b.load)
  t.teardown(stop)
  const [open] = await incidents(b.s)
  const i = await settled(b.s, open.id)
  await stop()
  t.equal(i.status, 'restored', 'verified restored by the restarted sidecar')
  t.ok(await eventually(() => page.incidents.get('sp-incident-1')?.status === 'resolved', 15_000), 'the page incident the first process created is resolved')
  forwardToResolved(t, page)
  t.equal(page.deliveries.filter((d) => d.method === 'POST').length, 1, 'no second create')
  t.ok(b.s.logs.some((l) => l.event === 'statuspage_incident_found'), 'found by its incident key')
})

t.test('without pagerDutyEscalationRoutingKey the escalation goes to the routing key, at critical, with the same dedup_key', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  const { s, load } = await shop(t, app, r, { escalationKey: false, notifications: { escalateAfter: '1h' }, trigger: { minRequests: 1000 }, verification: { timeoutMs: '2s', synthetics: [{ route: 'checkout', path: '/checkout/probe' }] } })
  app.failing.add('/checkout')
  await load.burst('/checkout/cart', 20)
  const m = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'killSwitch', flags: ['unrelated'], reason: 'wrong guess' })
  t.equal(m.status, 201)
  t.ok(await eventually(() => escalations(r).pd.length === 1, 30_000), 'escalated')
  t.match(escalations(r).pd[0]?.body, { routing_key: 'rk-main', event_action: 'trigger', payload: { severity: 'critical', summary: /ESCALATED/ } }, 'to the routing key, at critical')
  t.equal(r.pd.deliveries.filter((d) => d.body?.routing_key !== 'rk-main').length, 0, 'nothing to any other key')
})

t.test('the escalation deadline survives a restart: a sidecar started after it passed escalates at once, once', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  const stateDir = mkdtempSync(join(tmpdir(), 'breakwater-incidents-'))
  const a = await shop(t, app, r, { stateDir, notifications: { escalateAfter: '2s' }, trigger: { action: 'notify' } })
  await breakCheckout(app, a.s, a.load)
  const [i] = await incidents(a.s)
  await a.load.close()
  await a.s.sidecar.close()
  await until(Date.parse(i.escalateAt) + 200)
  const b = await shop(t, app, r, { stateDir, notifications: { escalateAfter: '2s' }, trigger: { action: 'notify' } })
  t.ok(await eventually(() => escalations(r).pd.length >= 1, 15_000), 'escalated')
  await sleep(1000)
  t.equal(escalations(r).pd.length, 1, 'once across both processes')
  const [after] = await incidents(b.s)
  t.equal(after.id, i.id)
  t.not(after.escalatedAt, null)
})

t.test('post-mortem draft: sections, and figures that match the traffic and the audit log; Markdown by default, JSON on request; 404', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  const { s, load } = await shop(t, app, r)
  const i = await restoredByTrigger(t, app, s, load)
  // Refusals by the kill switch are not failures.
  t.same(await load.burst('/checkout/cart', 5), [503, 503, 503, 503, 503])
  t.equal(i.status, 'restored')
  // The audit line follows the incident's change in memory: the draft reads the audit.
  t.ok(await eventually(async () => (await auditOf(s)).some((e) => e.action === 'incident.restored' && e.targets.includes(i.id)), 10_000), 'the restoration is audited')

  const res = await admin(s.admin, 'GET', `/v1/incidents/${i.id}/report?format=json`)
  t.equal(res.status, 200)
  const rep = res.body
  t.match(rep.impact, { routes: ['checkout'], requests: 20, requestsFailed: 20, peakErrorRate: 1 }, 'the 20 failed checkout requests, nothing invented')
  t.equal(rep.impact.probesExcluded, 0)
  t.match(rep.detection, { metric: 'error_rate', threshold: 0.5, windowSeconds: 10, value: 1, requests: 20, errors: 20 })
  t.ok(rep.times.firstFailureAt !== null && Date.parse(rep.times.firstFailureAt) <= Date.parse(i.detectedAt), 'the first failure held precedes detection')
  t.equal(rep.times.timeToDetectSeconds, (Date.parse(i.detectedAt) - Date.parse(rep.times.firstFailureAt)) / 1000)
  t.equal(rep.times.timeToMitigateSeconds, i.timeToMitigateSeconds)
  t.equal(rep.impact.durationSeconds, (Date.parse(i.restoredAt) - Date.parse(rep.times.firstFailureAt)) / 1000)

  const audit = await auditOf(s)
  const killed = audit.find((e) => e.action === 'mitigation.killSwitch')
  const restored = audit.find((e) => e.action === 'incident.restored' && e.targets.includes(i.id))
  t.equal(restored.timeToRestoreSeconds, rep.times.timeToRestoreSeconds, 'time to restore as audited')
  t.match(rep.actors, [{ by: 'trigger checkout-errors', kind: 'trigger', reasons: [killed.reason] }], 'who acted, with the reason audited')
  const timelineTimes = rep.timeline.map((e: any) => e.time)
  for (const e of audit.filter((x) => x.targets.includes(i.id) || x.action === 'mitigation.killSwitch')) t.ok(timelineTimes.includes(e.time), `${String(e.action)} at ${String(e.time)} is in the timeline`)
  t.same([...timelineTimes].sort(), timelineTimes, 'in time order')
  t.equal(rep.triage.scenario, 'feature_regression', 'what triage chose at detection')
  t.ok(rep.triage.ruledOut.length >= 2, 'and what it ruled out')
  t.ok(rep.openQuestions.length >= 2)
  t.ok(rep.notHeld.some((n: string) => /refused by a mitigation/.test(n)), 'says which figures it does not hold')

  const md = await fetch(`${s.admin}/v1/incidents/${i.id}/report`, { headers: { authorization: `Bearer ${TEST_TOKEN}` } })
  t.equal(md.status, 200)
  t.match(md.headers.get('content-type'), /^text\/markdown/)
  const text = await md.text()
  for (const h of ['# Post-mortem draft: shop incident', '## Summary', '## Impact', '## Timeline (UTC)', '## Who or what acted', '## Times', '## What triage ruled out', '## Open questions for the review', '## Not held by the sidecar']) t.match(text, h)
  t.match(text, /Requests failed: 20 of 20 on route\(s\) checkout/)
  t.match(text, /Peak error rate: 100\.0%/)
  t.match(text, new RegExp(`Time to restore \\(detection → verified restoration\\): ${String(i.timeToRestoreSeconds).replace('.', '\\.')} s`))
  const accept = await fetch(`${s.admin}/v1/incidents/${i.id}/report`, { headers: { authorization: `Bearer ${TEST_TOKEN}`, accept: 'application/json' } })
  t.match(await accept.json(), { incident: i.id }, 'Accept: application/json')

  const unknown = await admin(s.admin, 'GET', '/v1/incidents/i-nope/report')
  t.equal(unknown.status, 404)
  t.equal(unknown.body.error, 'unknown_incident')
  t.equal((await admin(s.admin, 'GET', `/v1/incidents/${i.id}/report?format=xml`)).status, 400)
})

t.test('breakwater incident report ID [--json] through a running sidecar', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  const { s, load } = await shop(t, app, r)
  const first = await restoredByTrigger(t, app, s, load)
  const env = { BREAKWATER_ADMIN_TOKEN: TEST_TOKEN, BREAKWATER_CONFIG: undefined }
  const cwd = tempDir(t)
  const md = await runCli(['incident', 'report', first.id, '--admin', s.admin], { env, cwd, timeoutMs: 60_000 })
  t.equal(md.code, 0, md.stderr)
  t.match(md.stdout, `# Post-mortem draft: shop incident ${String(first.id)}`)
  t.match(md.stdout, /Requests failed: 20 of 20/)
  const json = await runCli(['incident', 'report', first.id, '--json', '--admin', s.admin], { env, cwd, timeoutMs: 60_000 })
  t.equal(json.code, 0, json.stderr)
  t.match(JSON.parse(json.stdout), { incident: first.id, impact: { requestsFailed: 20 } })
  const missing = await runCli(['incident', 'report', 'i-nope', '--admin', s.admin], { env, cwd, timeoutMs: 60_000 })
  t.equal(missing.code, 1)
  t.match(missing.stderr, /unknown_incident/)
  const usage = await runCli(['incident', 'show'], { env, cwd, timeoutMs: 60_000 })
  t.equal(usage.code, 2)
})

t.test('a draft asked for right after an audited step holds that step: audit lines still being written are read once they land', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  const { s, load } = await shop(t, app, r)
  const first = await restoredByTrigger(t, app, s, load)
  // Committed and not yet on disk, as the restoration's line is when the incident already reads restored.
  const written = s.sidecar.control.journal.commit(s.sidecar.control.state, { action: 'incident.escalated', targets: [first.id], reason: 'a line committed just now', result: 'escalated', requester: 'breakwater' })
  const report = await s.sidecar.incidentReport(first.id)
  t.ok(await written, 'the line was written')
  t.ok(report?.timeline.some((e) => e.what === 'incident escalated (critical)' && e.reason === 'a line committed just now'), 'and it is in the draft asked for before it was written')
})

t.test('an unverified incident (no real traffic to judge by) is not escalated at once: its deadline stands', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  const { s, load } = await shop(t, app, r, { notifications: { escalateAfter: '3s' }, trigger: { minRequests: 1000 }, verification: { timeoutMs: '1s' } })
  app.failing.add('/checkout')
  await load.burst('/checkout/cart', 20)
  t.equal((await admin(s.admin, 'POST', '/v1/mitigations', { action: 'killSwitch', flags: ['newCheckout'], reason: 'checkout errors' })).status, 201)
  const [first] = await incidents(s)
  const i = await settled(s, first.id)
  t.equal(i.status, 'unverified')
  t.ok(await eventually(() => escalations(r).hook.length === 1, 30_000), 'escalated in the end')
  const [now] = await incidents(s)
  t.ok(Date.parse(now.escalatedAt) >= Date.parse(now.escalateAt), 'at the escalateAfter deadline, not when verification ended')
  t.match(now.escalationReason, /not verified restored within 3 s/)
  t.ok(Date.parse(escalations(r).hook[0]?.body.time) >= Date.parse(now.escalateAt))
})

t.test('a trigger\'s incident that ends unverified takes its status page incident back from monitoring to identified', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  // The kill switch refuses checkout; nobody uses the catalog, so nothing can show service back.
  const { s, load } = await shop(t, app, r, { notifications: { escalateAfter: '1h' }, verification: { timeoutMs: '1s' } })
  await breakCheckout(app, s, load)
  const [first] = await incidents(s)
  const i = await settled(s, first.id)
  t.equal(i.status, 'unverified')
  t.ok(await eventually(() => r.sp.deliveries.length === 4, 15_000), 'four updates of the page incident')
  await sleep(300)
  t.same(r.sp.deliveries.map((d) => [d.method, d.body.incident.status]), [['POST', 'investigating'], ['PATCH', 'identified'], ['PATCH', 'monitoring'], ['PATCH', 'identified']], 'no longer monitoring once verification is over')
  t.equal(r.sp.deliveries[3]?.url, '/v1/pages/page1/incidents/sp-incident-1', 'the same page incident')
  t.match(r.sp.deliveries[3]?.body.incident.body, /could not be confirmed/)
  t.same(Object.values(s.sidecar.control.state.statusPage)[0], { id: 'sp-incident-1', status: 'identified', round: 1 }, 'kept in stateDir with its round')
})

t.test('an incident that ended unverified is verified when real traffic returns: restored, its PagerDuty alert (both keys), escalation alert and page incident are resolved', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  const am = await startReceiver([200])
  t.teardown(am.close)
  // The kill switch refuses checkout; nobody uses the catalog yet, so verification ends unverified.
  const { s, load } = await shop(t, app, r, { notifications: { escalateAfter: '1s', alertmanager: { urls: [am.url], repeatInterval: '300ms' } }, verification: { timeoutMs: '1s' } })
  await breakCheckout(app, s, load)
  const [first] = await incidents(s)
  t.equal((await settled(s, first.id)).status, 'unverified')
  t.ok(await eventually(() => escalations(r).pd.length === 1, 15_000), 'escalated at its deadline')
  const escalationPosts = (): any[] => am.deliveries.flatMap((d) => d.body as any[]).filter((a) => a.labels?.alertname === 'BreakwaterIncidentEscalated')
  t.ok(await eventually(() => escalationPosts().length >= 2, 15_000), 'the escalation alert is re-posted')

  // Users come back to the catalog: their traffic judges the incident.
  const stop = users(load)
  t.teardown(stop)
  t.ok(await eventually(async () => (await incidents(s)).find((i) => i.id === first.id)?.status === 'restored', 30_000, 100), 'restored once real traffic returned')
  await stop()
  const [i] = await incidents(s)
  t.match(i, { id: first.id, status: 'restored', endedAt: i.restoredAt }, 'ended when verified')
  t.ok(s.logs.some((l) => l.event === 'incident' && l.phase === 'traffic_returned' && l.incident === i.id), 'logged')
  // Written in the background (state file first, then the audit line): it lands soon after.
  t.ok(await eventually(async () => (await auditOf(s)).some((e) => e.action === 'incident.verifying' && e.targets.includes(i.id)), 15_000), 'audited')

  t.ok(await eventually(() => ['rk-main', 'rk-escalation'].every((key) => r.pd.deliveries.some((d) => d.body.event_action === 'resolve' && d.body.routing_key === key)), 15_000), 'PagerDuty resolved on both routing keys')
  t.ok(await eventually(() => escalationPosts().some((a) => typeof a.endsAt === 'string'), 15_000), 'the escalation alert resolved')
  const posts = escalationPosts().length
  await sleep(900)
  t.equal(escalationPosts().length, posts, 'and no longer re-posted')
  t.ok(await eventually(() => r.sp.deliveries.at(-1)?.body.incident.status === 'resolved', 15_000), 'the page incident resolved')
  t.same(r.sp.deliveries.map((d) => d.body.incident.status), ['investigating', 'identified', 'monitoring', 'identified', 'monitoring', 'resolved'], 'back to monitoring while verified again, then resolved')
  t.ok(r.slack.deliveries.some((d) => /restored \(verified\)/.test(String(d.body?.text))), 'Slack says restored')
})

t.test('an incident that ended unverified before a restart is verified after it once real traffic returns', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  const stateDir = mkdtempSync(join(tmpdir(), 'breakwater-incidents-'))
  const options = { stateDir, notifications: { escalateAfter: '1s' }, verification: { timeoutMs: '1s' } }
  const a = await shop(t, app, r, options)
  await breakCheckout(app, a.s, a.load)
  const [first] = await incidents(a.s)
  t.equal((await settled(a.s, first.id)).status, 'unverified')
  t.ok(await eventually(() => escalations(r).pd.length === 1, 15_000), 'escalated before the restart')
  await a.load.close()
  await a.s.sidecar.close()

  const b = await shop(t, app, r, options)
  t.match((await incidents(b.s))[0], { id: first.id, status: 'unverified' }, 'still unverified after the restart')
  const stop = users(b.load)
  t.teardown(stop)
  t.ok(await eventually(async () => (await incidents(b.s)).find((i) => i.id === first.id)?.status === 'restored', 30_000, 100), 'restored once real traffic returned')
  await stop()
  t.ok(await eventually(() => ['rk-main', 'rk-escalation'].every((key) => r.pd.deliveries.some((d) => d.body.event_action === 'resolve' && d.body.routing_key === key)), 15_000), 'PagerDuty resolved on both routing keys')
  t.equal(escalations(r).pd.length, 1, 'escalated once')
})

t.test('an unverified incident verified again when real traffic returned, restarted meanwhile: its deadline runs from the return of the traffic, not from the mitigation', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  const stateDir = mkdtempSync(join(tmpdir(), 'breakwater-incidents-'))
  const timeoutMs = 5000
  const options = { stateDir, notifications: { escalateAfter: '1h' }, verification: { timeoutMs } }
  const a = await shop(t, app, r, options)
  await breakCheckout(app, a.s, a.load)
  const [first] = await incidents(a.s)
  t.equal((await settled(a.s, first.id)).status, 'unverified')
  // Users come back, and the catalog still fails them: verification goes on, undecided.
  app.failing.add('/catalog')
  const returnedAfter = Date.now()
  const stop = users(a.load)
  t.teardown(stop)
  t.ok(await eventually(async () => (await incidents(a.s)).find((i) => i.id === first.id)?.status === 'verifying', 30_000, 100), 'verified again once real traffic returned')
  await stop()
  await a.load.close()
  await a.s.sidecar.close()

  const b = await shop(t, app, r, options)
  t.ok(b.s.logs.some((l) => l.event === 'incident' && l.phase === 'resumed' && l.incident === first.id), 'the verification resumes after the restart')
  const ended = await settled(b.s, first.id)
  t.equal(ended.status, 'unverified', 'no real traffic since the restart: still nothing to judge by')
  t.ok(Date.parse(ended.endedAt) >= returnedAfter + timeoutMs, 'given its whole timeout from the return of the traffic, not ended at once')
  t.ok(Date.parse(ended.verifyUntil) >= returnedAfter + timeoutMs, 'the deadline it kept in stateDir')
})

interface OneRouteOptions {
  /** The trigger `errors`'s action. */
  action: 'rollback' | 'notify'
  rollback?: Record<string, unknown>
  notifications?: Record<string, unknown>
  verification?: Record<string, unknown>
}

/** A shop with one route, `all`, whose trigger `errors` takes `o.action`, and a webhook rollback to `cd`. */
async function oneRouteShop (t: Test, cd: Receiver, o: OneRouteOptions): Promise<{ s: TestSidecar, app: App, load: Traffic }> {
  const app = await startApp(t)
  const stateDir = mkdtempSync(join(tmpdir(), 'breakwater-incidents-'))
  const { config } = resolveConfig(testSidecarInput({
    service: 'shop',
    version: '3.1.0',
    upstreams: { app: { url: app.url } },
    routes: [{ name: 'all', match: { pathPrefix: '/' }, upstream: 'app' }],
    rollbackTriggers: [{ name: 'errors', metric: 'error_rate', threshold: 0.5, window: '10s', minRequests: 5, action: o.action }],
    rollback: { type: 'webhook', url: `${cd.url}/rollback`, ...o.rollback },
    notifications: o.notifications ?? {},
    ...(o.verification !== undefined ? { verification: o.verification } : {}),
    logging: { level: 'info', accessLog: false }
  }, stateDir))
  const s = await startCaptured(t, config, stateDir)
  const load = traffic(s.proxy)
  t.teardown(load.close)
  return { s, app, load }
}

/**
 * A sidecar whose trigger `errors` rolls back through a webhook to `cd`, fired at once by a
 * failing app (escalations go to `hook` when given).
 */
async function rolledBackByTrigger (t: Test, cd: Receiver, hook?: Receiver): Promise<TestSidecar> {
  const { s, app, load } = await oneRouteShop(t, cd, {
    action: 'rollback',
    notifications: hook === undefined ? {} : { webhooks: [`${hook.url}/events`], escalateAfter: '1h' }
  })
  app.failing.add('/')
  await load.burst('/cart', 10)
  s.sidecar.triggers.evaluate()
  return s
}

/** A sidecar whose trigger `errors` only notifies, with a webhook rollback to `cd` for operators. */
async function operatorShop (t: Test, cd: Receiver): Promise<{ s: TestSidecar, app: App, load: Traffic }> {
  return await oneRouteShop(t, cd, {
    action: 'notify',
    rollback: { cooldown: 0, retries: 0 },
    notifications: { escalateAfter: '1h' },
    verification: { intervalMs: 150, successes: 2, windowMs: '2s', timeoutMs: '2s' }
  })
}

t.test('an operator\'s rollback during a trigger\'s open incident acts within it: one incident, verified by the rollback', async (t) => {
  const cd = await startReceiver([200])
  t.teardown(cd.close)
  const { s, app, load } = await operatorShop(t, cd)
  app.failing.add('/')
  await load.burst('/cart', 10)
  s.sidecar.triggers.evaluate()
  const [fired] = await incidents(s)
  t.match(fired, { trigger: 'errors', status: 'detected', mitigation: null }, 'the trigger only notified')
  t.equal((await admin(s.admin, 'POST', '/v1/mitigations', { action: 'rollback', reason: 'bad release' })).status, 202)
  t.ok(await eventually(async () => (await incidents(s))[0]?.mitigation?.status === 'succeeded', 15_000), 'the rollback succeeded')
  const all = await incidents(s)
  t.equal(all.length, 1, 'no second incident')
  t.match(all[0], { id: fired.id, trigger: 'errors', mitigation: { action: 'rollback' } }, 'the trigger\'s incident holds the operator\'s rollback')
  app.failing.delete('/')
  const stop = users(load)
  t.teardown(stop)
  t.equal((await settled(s, fired.id)).status, 'restored', 'and is verified restored by it')
  await stop()
})

t.test('an operator\'s kill switch during a trigger\'s open incident of its route acts within it: one incident, verified and resolved by the kill', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  const { s, load } = await shop(t, app, r, { trigger: { action: 'notify' }, notifications: { escalateAfter: '1h' } })
  await breakCheckout(app, s, load)
  const [fired] = await incidents(s)
  t.match(fired, { trigger: 'checkout-errors', status: 'detected', mitigation: null }, 'the trigger only notified')
  // A kill switch no route of the incident carries is not its mitigation.
  t.equal((await admin(s.admin, 'POST', '/v1/mitigations', { action: 'killSwitch', flags: ['unrelated'], reason: 'another matter' })).status, 201)
  t.equal((await incidents(s)).length, 2, 'an incident of its own')
  const kill = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'killSwitch', flags: ['newCheckout'], reason: 'checkout errors' })
  t.equal(kill.status, 201)
  const all = await incidents(s)
  t.equal(all.length, 2, 'no third incident')
  t.match(all.find((i) => i.id === fired.id), { trigger: 'checkout-errors', status: 'verifying', mitigation: { id: kill.body.id, action: 'killSwitch' } }, 'the trigger\'s incident holds the operator\'s kill')
  const stop = users(load)
  t.teardown(stop)
  t.equal((await settled(s, fired.id)).status, 'restored', 'and is verified restored by it')
  await stop()
  t.ok(await eventually(() => r.pd.deliveries.some((d) => d.body.event_action === 'resolve' && d.body.routing_key === 'rk-main'), 15_000), 'its PagerDuty alert resolved')
  t.ok(await eventually(() => r.sp.deliveries.at(-1)?.body.incident.status === 'resolved', 15_000), 'its page incident resolved')
})

t.test('an operator\'s rate limit that sheds its trigger\'s whole route is judged like a kill switch: on the rest of the service, restored, never escalated', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  const { s, load } = await shop(t, app, r, {
    trigger: { action: 'notify' },
    notifications: { escalateAfter: '6s' },
    // A probe of the shed route would only measure the limit (429), as one of a killed route would.
    verification: { timeoutMs: '3s', synthetics: [{ path: '/checkout/cart', expectStatus: 200 }] }
  })
  await breakCheckout(app, s, load)
  const [fired] = await incidents(s)
  t.match(fired, { trigger: 'checkout-errors', status: 'detected', mitigation: null }, 'the trigger only notified')
  const shed = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'rateLimit', routes: ['checkout'], requestsPerSecond: 1e-30, reason: 'shed checkout' })
  t.equal(shed.status, 201)
  t.equal((await incidents(s)).length, 1, 'it acts within the trigger\'s incident')
  let shedding = true
  const refused: number[] = []
  const checkout = (async () => { while (shedding) { refused.push(...await load.burst('/checkout/cart', 3)); await sleep(100) } })()
  const stop = users(load)
  t.teardown(async () => { shedding = false; await checkout; await stop() })
  const i = await settled(s, fired.id)
  t.equal(i.status, 'restored', `verified on the rest of the service (${i.status}, checks ${JSON.stringify(i.checks)})`)
  t.equal(i.checks.syntheticRounds, 0, 'no probe of the shed route')
  await until(Date.parse(i.escalateAt) + 500)
  shedding = false
  await checkout
  await stop()
  t.ok(refused.length > 3 && refused.filter((x) => x !== 429).length <= 1, `checkout was shed all along but for its one token (${refused.join(',')})`)
  t.equal(escalations(r).hook.length, 0, 'nobody is paged for the shed')
  t.equal(escalations(r).pd.length, 0)
})

t.test('an operator\'s failed rollbacks: one incident, not one per attempt, and it ends on real traffic instead of staying detected', async (t) => {
  const cd = await startReceiver([400])
  t.teardown(cd.close)
  const { s, load } = await operatorShop(t, cd)
  for (let n = 0; n < 2; n++) {
    t.equal((await admin(s.admin, 'POST', '/v1/mitigations', { action: 'rollback', reason: 'bad release' })).status, 202)
    t.ok(await eventually(async () => (await admin(s.admin, 'GET', '/v1/state')).body.rollbacks?.filter((r: any) => r.status === 'failed').length === n + 1, 15_000), `rollback ${n + 1} failed`)
  }
  const all = await incidents(s)
  t.equal(all.length, 1, 'one incident for both attempts')
  const stop = users(load)
  t.teardown(stop)
  const i = await settled(s, all[0].id)
  await stop()
  t.equal(i.status, 'restored', 'judged on real traffic, which is fine: it ends')
  t.type(i.clearedAt, 'string')
  t.type(i.escalatedAt, 'string', 'the failed rollback was escalated')
})

t.test('a failed rollback escalates at once', async (t) => {
  const r = await receivers(t)
  const cd = await startReceiver([400])
  t.teardown(cd.close)
  const s = await rolledBackByTrigger(t, cd, r.hook)
  t.ok(await eventually(() => escalations(r).hook.length === 1, 15_000), 'escalated')
  const [i] = await incidents(s)
  t.match(i, { mitigation: { action: 'rollback', status: 'failed' } })
  t.match(i.escalationReason, /the rollback m-\S+ failed/)
  t.ok(Date.parse(i.escalatedAt) < Date.parse(i.escalateAt), 'long before the deadline')
})

t.test('post-mortem draft of a webhook rollback: its Idempotency-Key in the timeline, Markdown and JSON', async (t) => {
  const cd = await startReceiver([200])
  t.teardown(cd.close)
  const s = await rolledBackByTrigger(t, cd)
  t.ok(await eventually(async () => (await incidents(s))[0]?.mitigation?.status === 'succeeded', 15_000), 'the rollback succeeded')
  t.ok(await eventually(async () => (await auditOf(s)).some((e) => e.action === 'mitigation.rollback.result'), 15_000), 'and its result is audited')
  const key = cd.deliveries[0]?.headers['idempotency-key']
  t.match(key, /^[0-9a-f]{32}$/, 'the receiver got its Idempotency-Key')
  const [i] = await incidents(s)
  const rep = (await admin(s.admin, 'GET', `/v1/incidents/${String(i.id)}/report?format=json`)).body
  const withKey = (rep.timeline as any[]).filter((e) => e.idempotencyKey === key)
  t.same(withKey.map((e) => e.by), ['trigger errors', 'trigger errors'], 'the rollback\'s start and its result carry the key (JSON)')
  t.ok(withKey.every((e) => e.commit === undefined), 'a webhook has no commit')
  const md = await fetch(`${s.admin}/v1/incidents/${String(i.id)}/report`, { headers: { authorization: `Bearer ${TEST_TOKEN}` } })
  t.match(await md.text(), new RegExp(`\\| [^|]*idempotency key ${String(key)}[^|]*\\|`), 'the Markdown timeline names the key')
})

t.test('a successor carries the page incident\'s further status: what the key recorded or what it already knows', async (t) => {
  const recorded = { id: 'sp-1', status: 'identified' }
  t.same(furtherPage(recorded, { id: 'sp-1', status: 'monitoring' }), { id: 'sp-1', status: 'monitoring' }, 'its own client is further along')
  t.same(furtherPage(recorded, { id: 'sp-1', status: 'investigating' }), recorded, 'never backwards')
  t.same(furtherPage(recorded, { id: 'sp-2', status: 'resolved' }), recorded, 'another page incident does not count')
  t.same(furtherPage(recorded, { id: null, status: 'resolved' }), recorded, 'nor one without an id')
  t.same(furtherPage(recorded, null), recorded, 'nor nothing')
})

t.test('an incident shows its mitigation ended once what it changed is undone: restore, circuit auto, ttl, lift', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const s = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }],
    featureFlags: { other: true },
    circuitBreakers: { app: {} }
  })
  /** The incident whose mitigation has `id`. */
  const incidentOf = async (id: string): Promise<any> => (await admin(s.admin, 'GET', '/v1/incidents')).body.incidents.find((i: any) => i.mitigation?.id === id)
  const appliedId = (): string => (s.logs.filter((l) => l.event === 'incident' && l.phase === 'mitigated').at(-1)?.mitigation as string)

  t.equal((await admin(s.admin, 'PUT', '/v1/flags/other', { enabled: false, reason: 'kill other' })).status, 200)
  const killed = appliedId()
  t.match(await incidentOf(killed), { mitigation: { action: 'killSwitch', status: 'active' } })
  t.equal((await admin(s.admin, 'DELETE', '/v1/flags/other', { reason: 'restore other' })).status, 200)
  t.match(await incidentOf(killed), { mitigation: { action: 'killSwitch', status: 'lifted' } }, 'restore ends it')

  t.equal((await admin(s.admin, 'PUT', '/v1/circuits/app', { state: 'open', reason: 'open' })).status, 200)
  const opened = appliedId()
  t.not(opened, killed)
  t.equal((await admin(s.admin, 'PUT', '/v1/circuits/app', { state: 'auto', reason: 'auto' })).status, 200)
  t.match(await incidentOf(opened), { mitigation: { action: 'circuitBreak', status: 'lifted' } }, 'circuit auto ends it')

  t.equal((await admin(s.admin, 'PUT', '/v1/flags/other', { enabled: false, reason: 'for a second', ttl: '1s' })).status, 200)
  const expiring = appliedId()
  t.ok(await eventually(async () => (await incidentOf(expiring))?.mitigation.status === 'lifted', 10_000), 'its ttl ends it')

  const m = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'killSwitch', flags: ['other'], reason: 'mitigate' })
  t.equal(m.status, 201)
  t.match(await incidentOf(m.body.id), { mitigation: { status: 'active' } })
  t.equal((await admin(s.admin, 'DELETE', `/v1/mitigations/${m.body.id as string}`, { reason: 'lift' })).status, 200)
  t.match(await incidentOf(m.body.id), { mitigation: { status: 'lifted' } }, 'lift ends it')
})

t.test('the same kill or forced circuit again is the same mitigation: one incident, its ttl the new one', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const hook = await startReceiver([200])
  t.teardown(hook.close)
  const s = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }],
    featureFlags: { other: true },
    circuitBreakers: { app: {} },
    notifications: { webhooks: [hook.url] }
  })
  const first = await admin(s.admin, 'PUT', '/v1/flags/other', { enabled: false, reason: 'kill other' })
  const again = await admin(s.admin, 'PUT', '/v1/flags/other', { enabled: false, reason: 'kill other, retried', ttl: '1h' })
  t.equal(again.status, 200)
  t.equal(again.body.at, first.body.at, 'killed since the first call')
  t.ok(again.body.expiresAt !== null, 'the ttl given again is taken')
  t.equal((await admin(s.admin, 'PUT', '/v1/circuits/app', { state: 'open', reason: 'open' })).status, 200)
  t.equal((await admin(s.admin, 'PUT', '/v1/circuits/app', { state: 'open', reason: 'open again' })).status, 200)
  const incidents = (await admin(s.admin, 'GET', '/v1/incidents')).body.incidents as any[]
  t.equal(incidents.length, 2, 'one incident for the kill, one for the circuit')
  t.ok(await eventually(() => hook.deliveries.filter((d: Delivery) => d.body?.event === 'mitigation_applied').length === 2, 5000), 'two "applied" notifications')
  await sleep(300)
  t.equal(hook.deliveries.filter((d: Delivery) => d.body?.event === 'mitigation_applied').length, 2, 'and no more')
  t.equal(hook.deliveries.filter((d: Delivery) => d.body?.event === 'mitigation_lifted').length, 0, 'nothing was lifted')
  t.equal((await admin(s.admin, 'DELETE', '/v1/flags/other', { reason: 'restore' })).status, 200)
  const killed = ((await admin(s.admin, 'GET', '/v1/incidents')).body.incidents as any[]).find((i) => i.mitigation?.action === 'killSwitch')
  t.equal(killed?.mitigation.status, 'lifted', 'the restore ends the one kill')
})

t.test('an escalated incident that ended unverified, carried on by a newer incident of its key: the newer one\'s restoration resolves the escalation page too', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  const cd = await startReceiver([400])
  t.teardown(cd.close)
  const { s, load } = await shop(t, app, r, { notifications: { escalateAfter: '1h' }, rollback: { type: 'webhook', url: `${cd.url}/rollback`, retries: 0 }, verification: { timeoutMs: '1s' } })
  // An operator's rollback fails: its incident escalates at once, then ends unverified (nobody is using the service).
  t.equal((await admin(s.admin, 'POST', '/v1/mitigations', { action: 'rollback', reason: 'bad release' })).status, 202)
  t.ok(await eventually(() => escalations(r).pd.length === 1, 15_000), 'the failed rollback paged the escalation key')
  const [first] = await incidents(s)
  t.equal((await settled(s, first.id)).status, 'unverified')
  // The operator's next step opens a newer incident of the same key, which users' traffic verifies.
  t.equal((await admin(s.admin, 'POST', '/v1/mitigations', { action: 'killSwitch', flags: ['newCheckout'], reason: 'checkout errors' })).status, 201)
  const [second] = await incidents(s)
  t.not(second.id, first.id, 'a newer incident')
  const stop = users(load)
  t.teardown(stop)
  // Verified on the users' traffic (if its first verification ends unverified, when their traffic is seen).
  t.ok(await eventually(async () => (await incidents(s)).find((i) => i.id === second.id)?.status === 'restored', 30_000, 100), 'the newer incident is restored')
  await stop()
  const page = escalations(r).pd[0] as Delivery
  t.ok(await eventually(() => r.pd.deliveries.some((d) => d.body.event_action === 'resolve' && d.body.routing_key === 'rk-escalation' && d.body.dedup_key === page.body.dedup_key), 15_000), 'the escalation page is resolved')
  t.match(r.hook.deliveries.find((d) => d.body?.event === 'restoration_verified')?.body.details, { incident: second.id, escalated: false, supersededEscalated: [first.id] }, 'the notice names the incident whose escalation it ends')
})

t.test('a second incident of a trigger, and each mitigation, are new webhook deliveries: their Idempotency-Keys differ, a retry\'s does not', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  // The first attempt of every webhook delivery fails: its retry must carry the same key.
  r.hook.respond = [500, 200]
  const { s, load } = await shop(t, app, r, { trigger: { window: '2s' } })
  const first = await restoredByTrigger(t, app, s, load)
  t.equal(first.status, 'restored')
  await eventually(() => s.sidecar.triggers.status().find((x) => x.name === TRIGGER.name)?.state !== 'fired', 10_000, 100)
  t.equal((await admin(s.admin, 'DELETE', '/v1/flags/newCheckout', { reason: 'looks fixed' })).status, 200)
  t.ok(await eventually(async () => {
    await breakCheckout(app, s, load, 10)
    return (await incidents(s)).length === 2
  }, 15_000, 200), 'a new incident for the failure that came back')
  const [second] = await incidents(s)
  const keysOf = (kind: string): string[] => [...new Set(r.hook.deliveries.filter((d) => d.body?.event === kind).map((d) => String(d.headers['idempotency-key'])))]
  t.ok(await eventually(() => keysOf('trigger_fired').length === 2 && keysOf('mitigation_applied').length === 2, 15_000), 'each incident\'s trigger_fired and kill switch delivered under a key of its own')
  const fired = keysOf('trigger_fired')
  t.ok(fired[0]?.includes(first.id) && fired[1]?.includes(second.id), `each key names its incident (${fired.join(', ')})`)
  // The second delivery of each (the retry of the failed first attempt) had the key of the first.
  const attempts = r.hook.deliveries.filter((d) => d.body?.event === 'trigger_fired')
  t.equal(attempts[0]?.headers['idempotency-key'], attempts[1]?.headers['idempotency-key'], 'a retry carries the key of the attempt it repeats')
  const mitigations = r.hook.deliveries.filter((d) => d.body?.event === 'mitigation_applied').map((d) => d.body.details.id as string)
  t.equal(new Set(mitigations).size, 2, 'two kill switches')
  t.ok(keysOf('mitigation_applied').every((k, i) => k.includes(String([...new Set(mitigations)][i]))), 'a mitigation notice names its mitigation')
})

t.test('a later outage of a key whose page incident was resolved: a new page incident, created and updated under Idempotency-Keys of its own', async (t) => {
  const app = await startApp(t)
  const r = await receivers(t)
  const { s, load } = await shop(t, app, r, { trigger: { window: '2s' } })
  const first = await restoredByTrigger(t, app, s, load)
  t.equal(first.status, 'restored')
  t.ok(await eventually(() => r.sp.deliveries.some((d) => d.body?.incident?.status === 'resolved'), 15_000), 'the first page incident resolved')
  await eventually(() => s.sidecar.triggers.status().find((x) => x.name === TRIGGER.name)?.state !== 'fired', 10_000, 100)
  t.equal((await admin(s.admin, 'DELETE', '/v1/flags/newCheckout', { reason: 'looks fixed' })).status, 200)
  t.ok(await eventually(async () => {
    await breakCheckout(app, s, load, 10)
    return (await incidents(s)).length === 2
  }, 15_000, 200), 'a new incident for the failure that came back')
  const creates = (): Delivery[] => r.sp.deliveries.filter((d) => d.method === 'POST')
  t.ok(await eventually(() => creates().length === 2 && r.sp.deliveries.some((d) => d.url.endsWith('/sp-incident-2') && d.body?.incident?.status === 'identified'), 15_000), 'a second page incident, created and identified')
  const [a, b] = creates().map((d) => d.headers['idempotency-key'])
  t.not(b, a, `the later outage's create has a key of its own (${String(a)}, ${String(b)})`)
  const identified = r.sp.deliveries.filter((d) => d.method === 'PATCH' && d.body?.incident?.status === 'identified').map((d) => d.headers['idempotency-key'])
  t.equal(identified.length, 2)
  t.equal(new Set(identified).size, 2, `each page incident's update has a key of its own (${identified.join(', ')})`)
})

t.test('a later outage\'s create in flight at a restart is sent again under its own Idempotency-Key, not the resolved first page incident\'s', async (t) => {
  const page = await statusPage(t)
  const config = (): NotificationsConfig => ({ statusPageId: 'page', statusPageApiKey: 'key', statusPageUrl: page.url, maxAttempts: 3 }) as unknown as NotificationsConfig
  // Every call a real request to the page; the look-up of the restarted one fails (the page's
  // list down for a moment), so its create goes ahead under the key it was sent with.
  let lookupsFail = false
  const send: SendPageRequest = (req, settled) => {
    if (req.lookup === true && lookupsFail) { settled(false, null); return }
    fetch(req.url, { method: req.method, headers: { ...req.headers, 'content-type': 'application/json' }, body: req.body === null ? undefined : JSON.stringify(req.body) })
      .then(async (res) => { settled(res.ok, await res.json().catch(() => null)) }, () => { settled(false, null) })
  }
  const saved: Record<string, PageIncidentState> = {}
  const persist = (key: string, state: PageIncidentState | null): void => { if (state === null) delete saved[key]; else saved[key] = state }
  const key = 'shop-1.0.0-checkout-errors'
  const first = new StatusPageLifecycle(config, send, pino({ level: 'silent' }))
  first.onChange = persist
  first.advance(key, 'investigating', 'checkout errors', 'investigating')
  first.advance(key, 'resolved', 'checkout errors', 'resolved')
  t.ok(await eventually(() => page.incidents.get('sp-incident-1')?.status === 'resolved', 60_000), 'the first outage\'s page incident resolved')
  // The same key fails again: a later outage, a new page incident; its create's answer is lost to a restart.
  page.holdCreates = true
  first.advance(key, 'investigating', 'checkout errors', 'investigating again')
  t.ok(await eventually(() => page.incidents.size === 2, 60_000), 'the later outage\'s create reached the page')
  const creates = (): string[] => page.deliveries.filter((d) => d.method === 'POST').map((d) => String(d.headers['idempotency-key']))
  const [firstKey, laterKey] = creates()
  t.not(laterKey, firstKey, 'the later outage\'s create has a key of its own')
  page.holdCreates = false

  lookupsFail = true
  const restarted = new StatusPageLifecycle(config, send, pino({ level: 'silent' }))
  restarted.restore(JSON.parse(JSON.stringify(saved)) as Record<string, PageIncidentState>)
  restarted.onChange = persist
  restarted.advance(key, 'investigating', 'checkout errors', 'investigating again')
  t.ok(await eventually(() => creates().length === 3, 60_000), 'the create is sent again')
  t.equal(creates()[2], laterKey, 'under the key it was first sent with: a page that honours it makes one page incident, never answers with the resolved one')
  page.releaseCreates()
})
