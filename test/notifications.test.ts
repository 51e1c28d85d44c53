import t, { type Test } from 'tap'
import { startUpstream, echo, refusedUrl, type TestUpstream } from './helpers/upstream.js'
import { startTestSidecar, type TestSidecar } from './helpers/sidecar.js'
import { startFileSidecar } from './helpers/file-sidecar.js'
import { startReceiver, type Receiver } from './helpers/receiver.js'
import { admin } from './helpers/admin.js'
import { send, sleep, eventually } from './helpers/http.js'
import { metricValue } from './helpers/metrics.js'
import { traffic, median, type Traffic } from './helpers/traffic.js'
import { webhookKey, type NotificationEvent } from '../src/control/notify.js'
import { startStatusPage } from './helpers/status-page.js'

/** `fail` in the path → 500, `slow` → 200 after 300 ms, anything else → 200. */
async function app (t: Test): Promise<TestUpstream> {
  const up = await startUpstream((req, res, body) => {
    const url = req.url ?? '/'
    if (url.includes('fail')) { res.writeHead(500, { 'content-type': 'text/plain' }); res.end('upstream failed'); return }
    if (url.includes('slow')) { setTimeout(() => { if (!res.destroyed) echo(req, res, body) }, 300); return }
    echo(req, res, body)
  })
  t.teardown(up.close)
  return up
}

async function receiver (t: Test, respond: number[] = [200], delayMs = 0): Promise<Receiver> {
  const r = await startReceiver(respond)
  r.delayMs = delayMs
  t.teardown(r.close)
  return r
}

function load (t: Test, s: TestSidecar): Traffic {
  const l = traffic(s.proxy)
  t.teardown(l.close)
  return l
}

/** Two routes; `checkout` behind the `newCheckout` kill switch. */
function config (url: string, notifications: Record<string, unknown>, trigger: Record<string, unknown> | null, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    service: 'checkout',
    version: '2.4.1',
    upstreams: { app: { url } },
    routes: [
      { name: 'checkout', match: { pathPrefix: '/checkout' }, upstream: 'app', killSwitch: 'newCheckout' },
      { name: 'rest', match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    featureFlags: { newCheckout: true, otherFeature: true },
    notifications,
    rollbackTriggers: trigger === null ? [] : [trigger],
    ...extra
  }
}

const notifyTrigger = { name: 'checkout-errors', metric: 'error_rate', threshold: 0.5, window: '2s', minRequests: 3, action: 'notify', route: 'checkout' }

/** Fail enough checkout requests for the trigger, and evaluate at once. */
async function incident (s: TestSidecar, l: Traffic): Promise<void> {
  await l.burst('/checkout/fail', 5)
  s.sidecar.triggers.evaluate()
}

/** An operator's kill switch: one event with no trigger. Resolves to the mitigation's id. */
async function kill (s: TestSidecar, flag = 'otherFeature'): Promise<string> {
  const m = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'killSwitch', flags: [flag], reason: 'game day' })
  if (m.status !== 201) throw new Error(`mitigation refused: ${m.status} ${JSON.stringify(m.body)}`)
  return m.body.id as string
}

/** An operator's kill switch, applied and lifted: two events with no trigger. */
async function killAndLift (s: TestSidecar, flag = 'otherFeature'): Promise<void> {
  const id = await kill(s, flag)
  const lift = await admin(s.admin, 'DELETE', `/v1/mitigations/${id}`, { reason: 'game day over' })
  if (lift.status !== 200) throw new Error(`lift refused: ${lift.status}`)
}

async function settled (s: TestSidecar, timeoutMs = 8000): Promise<boolean> {
  return await eventually(() => s.sidecar.notifier.pending === 0, timeoutMs, 50)
}

t.test('each channel\'s payload: Slack, PagerDuty Events API v2, status page, generic webhook; fired, applied and lifted events', async (t) => {
  const up = await app(t)
  const slack = await receiver(t)
  const pd = await receiver(t, [202])
  const sp = await receiver(t, [201, 200])
  sp.answer = (d) => d.method === 'POST' ? { id: 'p0incident42', status: d.body.incident.status } : { id: 'p0incident42' }
  const hook = await receiver(t)
  const s = await startTestSidecar(t, config(up.url, {
    slackChannel: '#incidents-prod',
    slackWebhookUrl: `${slack.url}/services/T000/B000/XXXX`,
    pagerDutyServiceId: 'PSVC123',
    pagerDutyRoutingKey: 'routing-key-0123456789abcdef',
    pagerDutyUrl: `${pd.url}/v2/enqueue`,
    statusPageId: 'page42',
    statusPageApiKey: 'statuspage-key-0123456789',
    statusPageUrl: `${sp.url}/`,
    webhooks: [`${hook.url}/hooks/breakwater`]
  }, { ...notifyTrigger, action: 'killSwitch', flags: ['newCheckout'] }))
  const l = load(t, s)
  await incident(s, l)
  t.ok(await eventually(() => slack.deliveries.length >= 2 && hook.deliveries.length >= 2 && pd.deliveries.length >= 1 && sp.deliveries.length >= 1), 'every channel heard about it')
  t.ok(await settled(s))

  // Slack incoming webhook
  t.equal(slack.deliveries.length, 2, 'trigger fired + mitigation applied')
  for (const d of slack.deliveries) {
    t.equal(d.method, 'POST')
    t.equal(d.url, '/services/T000/B000/XXXX')
    t.match(d.headers['content-type'], /application\/json/)
    t.equal(d.body.channel, '#incidents-prod')
    t.type(d.body.text, 'string')
    t.match(d.body.text, /checkout/)
    t.ok(Array.isArray(d.body.blocks) && d.body.blocks.length > 0, 'blocks for a readable message')
    t.match(d.body.blocks[0], { type: 'section', text: { type: 'mrkdwn' } })
  }
  t.match(slack.deliveries.map((d) => d.body.text).join('\n'), /checkout-errors/, 'names the trigger')

  // PagerDuty Events API v2
  t.equal(pd.deliveries.length, 1, 'one PagerDuty event: the trigger fired')
  const event = pd.deliveries[0]
  t.equal(event?.url, '/v2/enqueue')
  t.equal(event?.method, 'POST')
  t.match(event?.body, {
    routing_key: 'routing-key-0123456789abcdef',
    event_action: 'trigger',
    dedup_key: /\S{8,}/,
    payload: { summary: /checkout-errors/, source: /checkout/, severity: /^(critical|error|warning|info)$/, custom_details: { service_id: 'PSVC123' } }
  })
  t.ok(event?.body.payload.summary.length <= 1024, 'summary within the API limit')

  // Status page: an incident created on fire, then updated by the id the page answered with:
  // identified (the kill switch), monitoring (verifying).
  t.equal(sp.deliveries.length, 3)
  const incidentReq = sp.deliveries[0]
  t.equal(incidentReq?.method, 'POST')
  t.equal(incidentReq?.url, '/v1/pages/page42/incidents')
  t.equal(incidentReq?.headers.authorization, 'OAuth statuspage-key-0123456789')
  t.match(incidentReq?.body, { incident: { name: /checkout/, status: 'investigating', body: /checkout-errors/ } })
  t.same(sp.deliveries.slice(1).map((d) => [d.method, d.url, d.body.incident.status]), [
    ['PATCH', '/v1/pages/page42/incidents/p0incident42', 'identified'],
    ['PATCH', '/v1/pages/page42/incidents/p0incident42', 'monitoring']
  ])

  // Generic webhook
  t.equal(hook.deliveries.length, 2)
  t.same(hook.deliveries.map((d) => d.url), ['/hooks/breakwater', '/hooks/breakwater'])
  t.same(hook.deliveries.map((d) => d.body.event).sort(), ['mitigation_applied', 'trigger_fired'])
  const fired = hook.deliveries.find((d) => d.body.event === 'trigger_fired')
  t.match(fired?.body, { service: 'checkout', version: '2.4.1', trigger: 'checkout-errors', summary: /error_rate/, time: /^\d{4}-/, details: { metric: 'error_rate', threshold: 0.5, action: 'killSwitch', requests: 5, errors: 5 } })
  const applied = hook.deliveries.find((d) => d.body.event === 'mitigation_applied')
  t.match(applied?.body, { trigger: 'checkout-errors', details: { action: 'killSwitch' } })

  // The operator lifts the trigger's kill switch.
  const id = (await admin(s.admin, 'GET', '/v1/state')).body.mitigations[0].id as string
  t.equal((await admin(s.admin, 'DELETE', `/v1/mitigations/${id}`, { reason: 'fix deployed' })).status, 200)
  t.ok(await eventually(() => hook.deliveries.length === 3 && slack.deliveries.length === 3), 'lifted: told too')
  const lifted = hook.deliveries[2]
  t.match(lifted?.body, { event: 'mitigation_lifted', trigger: 'checkout-errors', summary: /fix deployed/ })
  t.match(slack.deliveries[2]?.body, { channel: '#incidents-prod', text: /lifted/ })
  t.equal(await metricValue(s.ops, 'breakwater_notifications_failed_total'), 0)
})

t.test('every way a mitigation ends is announced once: restore, circuit auto or closed, a ttl running out, and a restore of a mitigate record', async (t) => {
  const up = await app(t)
  const hook = await receiver(t)
  const s = await startTestSidecar(t, config(up.url, { webhooks: [`${hook.url}/events`] }, null, { circuitBreakers: { app: {} } }))
  const events = (from: number): any[] => hook.deliveries.slice(from).map((d) => d.body)
  /** The events that `act` caused, once the notifier is idle. */
  const after = async (act: () => Promise<unknown>): Promise<any[]> => {
    const from = hook.deliveries.length
    await act()
    t.ok(await settled(s))
    return events(from)
  }

  // An operator's kill, then restore.
  const killed = await after(async () => await admin(s.admin, 'PUT', '/v1/flags/otherFeature', { enabled: false, reason: 'game day' }))
  t.same(killed.map((e) => e.event), ['mitigation_applied'])
  const restored = await after(async () => await admin(s.admin, 'DELETE', '/v1/flags/otherFeature', { reason: 'game day over' }))
  t.same(restored.map((e) => e.event), ['mitigation_lifted'], 'restore: one lifted event')
  t.match(restored[0], { details: { id: killed[0].details.id, action: 'killSwitch', targets: 'otherFeature', status: 'lifted' }, summary: /game day over/ })

  // A forced circuit handed back to automatic, and one forced closed.
  for (const end of ['auto', 'closed']) {
    const opened = await after(async () => await admin(s.admin, 'PUT', '/v1/circuits/app', { state: 'open', reason: 'drill' }))
    t.same(opened.map((e) => e.event), ['mitigation_applied'])
    const ended = await after(async () => await admin(s.admin, 'PUT', '/v1/circuits/app', { state: end, reason: `circuit ${end}` }))
    t.same(ended.map((e) => e.event), ['mitigation_lifted'], `circuit ${end} after a forced open: one lifted event`)
    t.match(ended[0], { details: { id: opened[0].details.id, action: 'circuitBreak', targets: 'app' } })
  }
  await admin(s.admin, 'PUT', '/v1/circuits/app', { state: 'auto', reason: 'done' })

  // A kill with a ttl that runs out.
  const from = hook.deliveries.length
  const ttlKill = await admin(s.admin, 'PUT', '/v1/flags/otherFeature', { enabled: false, reason: 'for a while', ttl: '1s' })
  t.equal(ttlKill.status, 200)
  t.ok(await eventually(() => events(from).some((e) => e.event === 'mitigation_lifted'), 10_000), 'the expiry is announced')
  t.ok(await settled(s))
  t.same(events(from).map((e) => e.event), ['mitigation_applied', 'mitigation_lifted'])
  t.match(events(from)[1], { details: { id: events(from)[0].details.id, action: 'killSwitch' }, summary: /ttl expired/ })

  // A `mitigate killSwitch` record whose flags an operator restores: the record ends with them,
  // announced once when the last of them is restored.
  const id = await kill(s, 'otherFeature')
  t.ok(await settled(s))
  t.ok((await admin(s.admin, 'PUT', '/v1/flags/newCheckout', { enabled: true, reason: 'pin on' })).status === 200)
  const mitigation = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'killSwitch', flags: ['newCheckout', 'otherFeature'], reason: 'two flags' })
  t.equal(mitigation.status, 201)
  t.ok(await settled(s))
  const first = await after(async () => await admin(s.admin, 'DELETE', '/v1/flags/otherFeature', { reason: 'one back' }))
  t.same(first.map((e) => e.event), ['mitigation_lifted'], 'the first record ended; the second still holds newCheckout')
  t.equal(first[0].details.id, id)
  t.equal((await admin(s.admin, 'GET', `/v1/mitigations/${mitigation.body.id as string}`)).body.status, 'active')
  const second = await after(async () => await admin(s.admin, 'PUT', '/v1/flags/newCheckout', { enabled: true, reason: 'all back' }))
  t.same(second.map((e) => e.event), ['mitigation_lifted'])
  t.match(second[0], { details: { id: mitigation.body.id, status: 'lifted' }, summary: /all back/ })
  const record = (await admin(s.admin, 'GET', `/v1/mitigations/${mitigation.body.id as string}`)).body
  t.match(record, { status: 'lifted', liftReason: 'all back' })
  const lift = await admin(s.admin, 'DELETE', `/v1/mitigations/${mitigation.body.id as string}`, { reason: 'again' })
  t.equal(lift.status, 409, 'nothing left to lift')
  t.ok(await settled(s))
  t.same(events(0).filter((e) => e.event === 'mitigation_lifted').length, 6, 'no event twice')
  const audit = (await admin(s.admin, 'GET', '/v1/audit?limit=50')).body.entries
  t.match(audit.find((e: any) => e.action === 'flag.expire'), { lifted: [events(from)[0].details.id] }, 'the audit line names what ended')
})

t.test('a fleet opens one incident: dedup_key and incident keys depend only on service, version and trigger', async (t) => {
  const up = await app(t)
  const pd = await receiver(t, [202])
  const sp = await receiver(t, [201])
  const hook = await receiver(t)
  const notifications = {
    pagerDutyRoutingKey: 'rk-fleet', pagerDutyUrl: pd.url, statusPageId: 'p1', statusPageApiKey: 'k1', statusPageUrl: sp.url, webhooks: [hook.url]
  }
  const fleet: TestSidecar[] = []
  for (const version of ['2.4.1', '2.4.1', '2.4.2']) {
    const s = await startTestSidecar(t, config(up.url, notifications, notifyTrigger, { version }))
    await incident(s, load(t, s))
    fleet.push(s)
  }
  t.ok(await eventually(() => pd.deliveries.length === 3 && sp.deliveries.length === 3 && hook.deliveries.length === 3))
  const byVersion = (r: Receiver, version: string): Array<Receiver['deliveries'][number]> =>
    r.deliveries.filter((d) => JSON.stringify(d.body).includes(`"${version}"`))
  const [a, b] = byVersion(pd, '2.4.1')
  const [c] = byVersion(pd, '2.4.2')
  t.equal(a?.body.dedup_key, b?.body.dedup_key, 'two sidecars of one version: one dedup_key')
  t.not(a?.body.dedup_key, c?.body.dedup_key, 'another version is another incident')
  const [sa, sb] = byVersion(sp, '2.4.1')
  t.equal(sa?.headers['idempotency-key'], sb?.headers['idempotency-key'], 'one status page incident for the fleet')
  t.not(sa?.headers['idempotency-key'], byVersion(sp, '2.4.2')[0]?.headers['idempotency-key'])
  const [ha, hb] = byVersion(hook, '2.4.1')
  t.equal(ha?.body.incidentKey, hb?.body.incidentKey)
  t.not(ha?.body.incidentKey, byVersion(hook, '2.4.2')[0]?.body.incidentKey)
})

t.test('a failed delivery is retried with exponential backoff until it succeeds', async (t) => {
  const up = await app(t)
  const hook = await receiver(t, [500, 503, 200])
  const s = await startTestSidecar(t, config(up.url, { webhooks: [hook.url] }, null))
  await kill(s)
  t.ok(await eventually(() => hook.deliveries.length >= 3, 6000), 'delivered on the third attempt')
  t.ok(await settled(s))
  const applied = hook.deliveries
  t.equal(applied.length, 3, 'no attempt after the success')
  t.ok(applied.every((d) => d.body.event === 'mitigation_applied'), 'every attempt carries the same event')
  t.equal(new Set(applied.map((d) => d.headers['idempotency-key'])).size, 1, 'one idempotency key for every attempt')
  const [first, second, third] = applied.map((d) => d.at)
  const gaps = [(second ?? 0) - (first ?? 0), (third ?? 0) - (second ?? 0)]
  t.ok((gaps[0] ?? 0) >= 300, `a pause before the first retry (${gaps.join(', ')} ms)`)
  t.ok((gaps[1] ?? 0) > (gaps[0] ?? 0), `the pause grows (${gaps.join(', ')} ms)`)
  t.equal(await metricValue(s.ops, 'breakwater_notifications_sent_total', { channel: 'webhook' }), 1)
  t.equal(await metricValue(s.ops, 'breakwater_notifications_failed_total', { channel: 'webhook' }), 0, 'a retried success is not a failure')
  t.equal(s.logs.filter((l) => l.event === 'notification_retry' && l.channel === 'webhook').length, 2)
})

t.test('a receiver that answers 429 or 503 with Retry-After is not tried again before it asked: seconds or an HTTP-date', async (t) => {
  const up = await app(t)
  const hook = await receiver(t, [429, 503, 200])
  // Slack-style seconds first, then an HTTP-date (RFC 9110 §10.2.3), each asking for 2 s.
  hook.answerHeaders = (d) => hook.deliveries.indexOf(d) === 0 ? { 'retry-after': '2' } : { 'retry-after': new Date(Date.now() + 3000).toUTCString() }
  const s = await startTestSidecar(t, config(up.url, { maxAttempts: 3, webhooks: [hook.url] }, null))
  await kill(s)
  t.ok(await eventually(() => hook.deliveries.length >= 3, 15_000), 'delivered on the third attempt')
  t.ok(await settled(s))
  const [first, second, third] = hook.deliveries.map((d) => d.at)
  const gaps = [(second ?? 0) - (first ?? 0), (third ?? 0) - (second ?? 0)]
  // An HTTP-date has whole seconds: 3 s ahead is at least 2 s ahead.
  t.ok((gaps[0] ?? 0) >= 1950 && (gaps[1] ?? 0) >= 1950, `each retry waited as asked (${gaps.join(', ')} ms)`)
  t.equal(await metricValue(s.ops, 'breakwater_notifications_failed_total', { channel: 'webhook' }), 0, 'not lost')
  t.match(s.logs.filter((l) => l.event === 'notification_retry').map((l) => l.retryInMs), [Number, Number])
  t.ok(s.logs.filter((l) => l.event === 'notification_retry').every((l) => (l.retryInMs as number) >= 1000), 'the log says how long it waits')
})

t.test('a stopping sidecar delivers what is waiting for a retry before it exits, and counts and logs what it could not', async (t) => {
  const up = await app(t)
  const hook = await receiver(t, [500, 200])
  const dead = await refusedUrl()
  const s = await startTestSidecar(t, config(up.url, { webhooks: [hook.url, `${dead}/hook`] }, null))
  await kill(s)
  t.ok(await eventually(() => hook.answered >= 1 && s.logs.filter((l) => l.event === 'notification_retry').length >= 2, 5000), 'both deliveries failed once and wait for a retry')
  await s.sidecar.shutdown()
  t.equal(hook.deliveries.length, 2, 'the retry went out before the sidecar stopped')
  t.equal(hook.answered, 2)
  const dropped = s.logs.filter((l) => l.event === 'notification_dropped')
  t.equal(dropped.length, 1, 'the one a refused receiver never took is logged')
  t.match(dropped[0], { channel: 'webhook', cause: 'shutdown', level: 'warn' })
  t.equal(s.sidecar.notifier.dropped, 1, 'and counted')
})

t.test('a trigger that fires again while its status page incident is being resolved opens a new page incident once the resolve is answered', async (t) => {
  const up = await app(t)
  const page = await startStatusPage()
  t.teardown(page.close)
  const s = await startTestSidecar(t, config(up.url, { statusPageId: 'p1', statusPageApiKey: 'k1', statusPageUrl: page.url }, null))
  const event = (kind: NotificationEvent['kind']): NotificationEvent => ({ kind, service: 'checkout', version: '2.4.1', trigger: 'checkout-errors', summary: kind, details: {}, time: new Date().toISOString() })
  s.sidecar.notifier.notify(event('trigger_fired'))
  t.ok(await settled(s), 'the first outage is on the page')
  page.holdUpdates = true
  s.sidecar.notifier.notify(event('restoration_verified'))
  t.ok(await eventually(() => page.deliveries.some((d) => d.method === 'PATCH')), 'the resolve reached the page; its answer is held')
  // The service fails again before the page has answered the resolve: a new outage.
  s.sidecar.notifier.notify(event('trigger_fired'))
  page.holdUpdates = false
  page.releaseCreates()
  t.ok(await eventually(() => page.incidents.size === 2, 5000), `a second page incident for the new outage (${page.incidents.size})`)
  t.ok(await settled(s))
  t.same([...page.incidents.values()].map((i) => i.status), ['resolved', 'investigating'], 'the first resolved, the new one investigating')
})

t.test('two mitigations are two webhook deliveries: a kill switch and another, each applied and lifted, under keys of their own', async (t) => {
  const up = await app(t)
  const hook = await receiver(t)
  const s = await startTestSidecar(t, config(up.url, { webhooks: [hook.url] }, null))
  await killAndLift(s, 'otherFeature')
  await killAndLift(s, 'newCheckout')
  t.ok(await eventually(() => hook.deliveries.length === 4), 'two applied, two lifted')
  const keys = hook.deliveries.map((d) => String(d.headers['idempotency-key']))
  t.equal(new Set(keys).size, 4, `four deliveries, four keys (${keys.join(', ')})`)
  for (const d of hook.deliveries) t.ok(String(d.headers['idempotency-key']).includes(d.body.details.id), 'the key names the mitigation')
})

t.test('a mitigation id in any characters (a flag source\'s key) still makes a valid Idempotency-Key: visible ASCII, one per id', async (t) => {
  const event = { kind: 'mitigation_applied' as const, service: 'checkout', version: '2.4.1', trigger: null, summary: 'killed', time: new Date().toISOString() }
  const keys = ['flag:новый-checkout@mx1', 'flag:nouveau café@mx1', 'flag:a\ud800b@mx1', 'flag:plain@mx1'].map((id) => webhookKey({ ...event, details: { id } }))
  for (const key of keys) t.match(key, /^[\x21-\x7e]+$/, key)
  t.equal(new Set(keys).size, keys.length)
  t.ok(keys[3]?.includes('flag:plain@mx1'), 'an id in visible ASCII is kept as it is')
})

t.test('one incident\'s messages reach each receiver in the order they happened: a retried one keeps its place', async (t) => {
  const up = await app(t)
  // Each receiver refuses its first delivery once: the first message is retried after a backoff.
  const hook = await receiver(t, [500, 200])
  const pd = await receiver(t, [500, 200])
  const s = await startTestSidecar(t, config(up.url, { webhooks: [hook.url], pagerDutyRoutingKey: 'rk', pagerDutyUrl: pd.url }, null))
  await killAndLift(s)
  // A trigger's incident, detected and verified restored at once (as a quick rollback would).
  const event = { service: 'checkout', version: '2.4.1', trigger: 'checkout-errors', summary: 'checkout errors', time: new Date().toISOString() }
  s.sidecar.notifier.notify({ ...event, kind: 'trigger_fired', details: {} })
  s.sidecar.notifier.notify({ ...event, kind: 'restoration_verified', details: {} })
  t.ok(await settled(s), 'every message was settled')
  const operators = hook.deliveries.filter((d) => d.body.trigger === null)
  t.same(operators.map((d) => d.body.event), ['mitigation_applied', 'mitigation_applied', 'mitigation_lifted'], '"lifted" waits for the retry of "applied"')
  t.same(pd.deliveries.map((d) => d.body.event_action), ['trigger', 'trigger', 'resolve'], 'the resolve is the last word: the retried trigger never reopens the alert')
  t.equal(await metricValue(s.ops, 'breakwater_notifications_failed_total', { channel: 'pagerduty' }), 0)
})

t.test('a receiver that hangs holds only its own deliveries: PagerDuty is paged while four webhooks hang', async (t) => {
  const up = await app(t)
  // Never answers during the test: its deliveries end only by the notifier's own timeout.
  const hanging = await receiver(t, [200], 3_600_000)
  const pd = await receiver(t)
  const s = await startTestSidecar(t, config(up.url, {
    webhooks: [`${hanging.url}/a`, `${hanging.url}/b`, `${hanging.url}/c`, `${hanging.url}/d`],
    pagerDutyRoutingKey: 'rk',
    pagerDutyUrl: pd.url
  }, null))
  await kill(s) // four webhook deliveries, each left hanging
  t.ok(await eventually(() => hanging.deliveries.length === 4), 'the four webhooks are being called')
  s.sidecar.notifier.notify({ service: 'checkout', version: '2.4.1', trigger: 'checkout-errors', kind: 'trigger_fired', summary: 'checkout errors', details: {}, time: new Date().toISOString() })
  t.ok(await eventually(() => pd.deliveries.length === 1, 30_000), 'PagerDuty was paged')
  t.equal(s.logs.filter((l) => l.event === 'notification_retry').length, 0, 'before any hanging delivery gave up its place')
  t.equal(hanging.answered, 0, 'while the webhooks still hang')
})

t.test('a receiver that keeps failing is given up on after maxAttempts: logged and counted per channel', async (t) => {
  const up = await app(t)
  const hook = await receiver(t, [500])
  const pd = await receiver(t, [400])
  const s = await startTestSidecar(t, config(up.url, {
    maxAttempts: 2,
    webhooks: [hook.url],
    slackWebhookUrl: `${await refusedUrl()}/slack`,
    slackChannel: '#x',
    pagerDutyRoutingKey: 'rk',
    pagerDutyUrl: pd.url
  }, notifyTrigger))
  const l = load(t, s)
  await incident(s, l)
  t.ok(await settled(s), 'every message was settled')
  t.equal(hook.deliveries.length, 2, 'a 5xx is retried up to maxAttempts')
  t.equal(pd.deliveries.length, 1, 'a 4xx is final')
  t.equal(await metricValue(s.ops, 'breakwater_notifications_failed_total', { channel: 'webhook' }), 1)
  t.equal(await metricValue(s.ops, 'breakwater_notifications_failed_total', { channel: 'slack' }), 1, 'connection refused counts too')
  t.equal(await metricValue(s.ops, 'breakwater_notifications_failed_total', { channel: 'pagerduty' }), 1)
  t.equal(await metricValue(s.ops, 'breakwater_notifications_failed_total', { channel: 'statuspage' }), 0)
  const failed = s.logs.filter((x) => x.event === 'notification_failed')
  t.same(failed.map((x) => x.channel).sort(), ['pagerduty', 'slack', 'webhook'])
  t.ok(failed.every((x) => x.level === 'error'), 'logged at error')
  t.match(failed.find((x) => x.channel === 'webhook'), { attempts: 2, failure: /500/ })
  t.equal((await send(s.proxy, '/home')).status, 200, 'proxying carries on')
  t.match((await admin(s.admin, 'GET', '/v1/state')).body.triggers[0], { fired: 1, lastOutcome: 'notified' })
})

t.test('a full queue drops its oldest message and counts it', async (t) => {
  const up = await app(t)
  const slow = await receiver(t, [200], 2000)
  const s = await startTestSidecar(t, config(up.url, {
    queueSize: 1,
    slackWebhookUrl: `${slow.url}/slack`,
    slackChannel: '#x',
    webhooks: [`${slow.url}/w1`, `${slow.url}/w2`, `${slow.url}/w3`]
  }, null))
  // Two events, four messages each: four are delivered at once (and take 2 s); the
  // queue holds one, so three of the second event's messages are dropped.
  await killAndLift(s)
  t.equal(s.sidecar.notifier.dropped, 3)
  t.equal(await metricValue(s.ops, 'breakwater_notifications_dropped_total'), 3)
  t.equal(s.logs.filter((x) => x.event === 'notification_dropped').length, 3, 'each drop is logged')
  t.ok(await settled(s, 8000))
  t.equal(slow.deliveries.length, 5)
  const first = slow.deliveries.slice(0, 4)
  t.same(first.map((d) => d.url).sort(), ['/slack', '/w1', '/w2', '/w3'], 'the first event went out on every channel')
  t.ok(first.every((d) => d.url === '/slack' ? /applied/.test(d.body.text) : d.body.event === 'mitigation_applied'))
  t.match(slow.deliveries[4], { url: '/w3', body: { event: 'mitigation_lifted' } }, 'the newest message survived')
})

t.test('messages waiting for a retry are bounded by the queue too', async (t) => {
  const up = await app(t)
  const dead = await refusedUrl()
  const s = await startTestSidecar(t, config(up.url, { queueSize: 2, maxAttempts: 5, webhooks: [`${dead}/hook`] }, null))
  for (let i = 0; i < 6; i++) await killAndLift(s) // 12 messages, each refused at once and scheduled for a retry
  const held = s.sidecar.notifier.pending
  const dropped = s.sidecar.notifier.dropped
  t.ok(held <= 2 + 4, `at most queueSize + the 4 in flight are held (held ${held}, dropped ${dropped})`)
  t.equal(held + dropped, 12, 'every message is either held or counted as dropped')
})

t.test('secrets never reach a log line: routing key, API key, webhook URLs', async (t) => {
  const up = await app(t)
  const slack = await receiver(t, [500])
  const pd = await receiver(t, [503])
  const sp = await receiver(t, [401])
  const dead = await refusedUrl()
  const secrets = {
    slack: 'T0SECRET/B0SECRET/xoxSlackSecret123',
    routingKey: 'pd-routing-key-SECRET-456',
    apiKey: 'sp-api-key-SECRET-789',
    hookToken: 'hook-token-SECRET-abc'
  }
  const slackUrl = `${slack.url}/services/${secrets.slack}`
  const hookUrls = [`${dead}/hooks?token=${secrets.hookToken}`, `http://hooks-user:${secrets.hookToken}@127.0.0.1:${new URL(dead).port}/basic`]
  const s = await startTestSidecar(t, config(up.url, {
    maxAttempts: 2,
    slackChannel: '#incidents',
    slackWebhookUrl: slackUrl,
    pagerDutyServiceId: 'PSVC',
    pagerDutyRoutingKey: secrets.routingKey,
    pagerDutyUrl: pd.url,
    statusPageId: 'page1',
    statusPageApiKey: secrets.apiKey,
    statusPageUrl: sp.url,
    webhooks: hookUrls
  }, { ...notifyTrigger, action: 'killSwitch', flags: ['newCheckout'] }, { logging: { level: 'debug' } }))
  const l = load(t, s)
  await incident(s, l)
  t.ok(await settled(s, 8000))
  const id = (await admin(s.admin, 'GET', '/v1/state')).body.mitigations[0]?.id as string
  await admin(s.admin, 'DELETE', `/v1/mitigations/${id}`, { reason: 'done' })
  t.ok(await settled(s, 8000))
  // The deliveries did carry the secrets: the scan below is meaningful.
  t.equal(pd.deliveries[0]?.body.routing_key, secrets.routingKey)
  t.equal(sp.deliveries[0]?.headers.authorization, `OAuth ${secrets.apiKey}`)
  const failures = s.logs.filter((x) => x.event === 'notification_failed' || x.event === 'notification_retry')
  t.ok(failures.length >= 5, `every channel failed and was logged (${failures.length} lines)`)
  const text = s.logs.map((x) => JSON.stringify(x)).join('\n')
  for (const [what, secret] of Object.entries(secrets)) t.notOk(text.includes(secret), `no log line holds the ${what}`)
  t.notOk(text.includes(slackUrl), 'nor the Slack webhook URL')
  for (const u of hookUrls) t.notOk(text.includes(u), 'nor a webhook URL')
  const metrics = await (await fetch(`${s.ops}/metrics`)).text()
  for (const secret of Object.values(secrets)) t.notOk(metrics.includes(secret), 'nor /metrics')
  const state = JSON.stringify((await admin(s.admin, 'GET', '/v1/state')).body)
  for (const secret of Object.values(secrets)) t.notOk(state.includes(secret), 'nor GET /v1/state')
})

t.test('a mistyped secret webhook URL in a reloaded config is refused without writing the secret to the logs', async (t) => {
  const up = await app(t)
  const slack = await receiver(t)
  const secret = 'xoxReloadSecret-0123456789'
  const input = (slackWebhookUrl: string): Record<string, unknown> => ({
    upstreams: { app: { url: up.url } },
    routes: [{ name: 'rest', match: { pathPrefix: '/' }, upstream: 'app' }],
    notifications: { slackChannel: '#x', slackWebhookUrl }
  })
  const s = await startFileSidecar(t, input(`${slack.url}/services/T0/B0/${secret}`))
  // The URL pasted from a secret file, trailing newline and all.
  s.rewrite(input(`${slack.url}/services/T0/B0/${secret}\n`))
  const reload = await admin(s.admin, 'POST', '/v1/reload', { reason: 'rotate the Slack webhook' })
  t.equal(reload.status, 422, 'the invalid config is refused')
  t.match(JSON.stringify(reload.body.problems), /slackWebhookUrl/, 'the problem names the key')
  t.ok(s.logs.some((x) => x.event === 'config_reload' && x.result === 'refused'), 'the refusal is logged')
  const leaking = s.logs.filter((x) => JSON.stringify(x).includes(secret))
  t.same(leaking.map((x) => x.event), [], 'no log line holds the webhook secret')
  const audit = (await admin(s.admin, 'GET', '/v1/audit?limit=10')).body.entries as unknown[]
  t.notOk(JSON.stringify(audit).includes(secret), 'nor the audit log')
})

t.test('a slow or failing receiver does not slow proxied requests', async (t) => {
  const up = await app(t)
  // The slow receiver never answers during the test: a request that waited on a delivery
  // would never complete.
  const slow = await receiver(t, [200], 3_600_000)
  const failing = await receiver(t, [500])
  const s = await startTestSidecar(t, config(up.url, {
    slackWebhookUrl: `${slow.url}/slack`,
    slackChannel: '#x',
    pagerDutyRoutingKey: 'rk',
    pagerDutyUrl: `${slow.url}/pd`,
    statusPageId: 'p',
    statusPageApiKey: 'k',
    statusPageUrl: failing.url,
    webhooks: [`${slow.url}/a`, `${failing.url}/b`, `${await refusedUrl()}/c`]
  }, notifyTrigger))
  const l = load(t, s)
  for (let i = 0; i < 5; i++) await l.timed('/home') // warm the pool
  const baseline: number[] = []
  for (let i = 0; i < 10; i++) baseline.push((await l.timed('/home')).ms)

  await incident(s, l)
  await killAndLift(s)
  await killAndLift(s)
  t.ok(s.sidecar.notifier.pending >= 10, `notifications pending (${s.sidecar.notifier.pending})`)
  const during: number[] = []
  for (let i = 0; i < 20; i++) {
    const r = await l.timed('/home')
    t.equal(r.status, 200)
    during.push(r.ms)
  }
  t.ok(s.sidecar.notifier.pending > 0, 'still pending after the measurement')
  t.ok(slow.deliveries.length > 0, 'the slow receiver is being called')
  t.equal(slow.answered, 0, 'every request completed while the slow receiver held all its deliveries unanswered')
  t.comment(`median latency ${median(during).toFixed(1)} ms with deliveries pending (baseline ${median(baseline).toFixed(1)} ms, max ${Math.max(...during).toFixed(1)} ms)`)
  t.equal((await l.burst('/home', 20)).filter((c) => c === 200).length, 20, 'concurrent requests too')
  await sleep(10)
})
