/**
 * The failover and rateLimit mitigations (SPEC §6, §17) from the operator's side: the admin
 * API and the real `breakwater` binary against a real sidecar in front of real upstreams —
 * applied at once, audited, lifted, expired by their ttl, re-applied after a restart, refused
 * with a clear 400; and triage recommending failover before circuit break when it applies.
 */
import t, { type Test } from 'tap'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { startUpstream, type Handler } from './helpers/upstream.js'
import { startTestSidecar, testSidecarInput, TEST_TOKEN, type TestSidecar } from './helpers/sidecar.js'
import { resolveConfig } from '../src/config/load.js'
import { admin } from './helpers/admin.js'
import { send, eventually } from './helpers/http.js'
import { scrape, sumOf } from './helpers/metrics.js'
import { operator, parseOnlyJson } from './helpers/operator.js'

// The CLI runs as fresh Node processes; leave room for a busy machine.
t.setTimeout(300_000)

const withToken = { BREAKWATER_ADMIN_TOKEN: TEST_TOKEN }

/** Answers `name` (200), or 503 while `state.failing`. */
function named (name: string, state = { failing: false }): Handler {
  return (_req, res) => {
    res.writeHead(state.failing ? 503 : 200, { 'content-type': 'text/plain' })
    res.end(name)
  }
}

interface Shop {
  s: TestSidecar
  primaryState: { failing: boolean }
  soloState: { failing: boolean }
  stateDir: string
  input: Record<string, unknown>
}

/**
 * `primary` (failover `dr`) behind route `api`; `solo` (no failover) behind route `solo`.
 * The state dir outlives the sidecar, for restarts.
 */
async function shop (t: Test): Promise<Shop> {
  const primaryState = { failing: false }
  const soloState = { failing: false }
  const primary = await startUpstream(named('primary', primaryState))
  const dr = await startUpstream(named('dr'))
  const solo = await startUpstream(named('solo', soloState))
  t.teardown(primary.close)
  t.teardown(dr.close)
  t.teardown(solo.close)
  const stateDir = mkdtempSync(join(tmpdir(), 'breakwater-rungs-'))
  t.teardown(() => { rmSync(stateDir, { recursive: true, force: true }) })
  const input = {
    stateDir,
    upstreams: { primary: { url: primary.url, failover: 'dr' }, dr: { url: dr.url }, solo: { url: solo.url } },
    routes: [
      { name: 'api', match: { pathPrefix: '/api' }, upstream: 'primary' },
      { name: 'solo', match: { pathPrefix: '/' }, upstream: 'solo' }
    ],
    logging: { level: 'info', accessLog: false }
  }
  return { s: await startTestSidecar(t, input), primaryState, soloState, stateDir, input }
}

async function servedBy (s: TestSidecar, path = '/api/x'): Promise<{ body: string, failover: unknown }> {
  const r = await send(s.proxy, path)
  return { body: r.body, failover: r.headers['x-breakwater-failover'] }
}

async function audit (s: TestSidecar): Promise<any[]> {
  return (await admin(s.admin, 'GET', '/v1/audit?limit=100')).body.entries as any[]
}

t.test('breakwater failover: traffic goes to the failover, marked; lift brings it back; audited and counted', async (t) => {
  const { s } = await shop(t)
  const run = operator(t)
  t.same(await servedBy(s), { body: 'primary', failover: undefined }, 'before: the primary serves')

  const applied = await run(['failover', 'primary', '--reason', 'primary region degraded', '--admin', s.admin], withToken)
  t.equal(applied.code, 0, applied.stderr)
  const m = /mitigation (\S+): failover applied — primary → dr/.exec(applied.stdout)
  t.ok(m, `the output names the mitigation and where the traffic goes: ${applied.stdout}`)
  const id = m?.[1] ?? ''
  t.match(applied.stdout, `breakwater lift ${id}`, 'and how to lift it')
  t.same(await servedBy(s), { body: 'dr', failover: 'dr' }, 'the failover serves, marked x-breakwater-failover')
  t.same(await servedBy(s, '/other'), { body: 'solo', failover: undefined }, 'other upstreams are untouched')

  const status = await run(['status', '--admin', s.admin], withToken)
  t.match(status.stdout, new RegExp(`${id}\\s+failover\\s+active\\s+primary → dr`), 'breakwater status shows where the traffic goes')
  const st = (await admin(s.admin, 'GET', '/v1/state')).body
  t.match(st.mitigations, [{ id, action: 'failover', targets: ['primary'], to: 'dr', status: 'active', expiresAt: null }], 'GET /v1/state lists it')
  const entry = (await audit(s)).find((e) => e.action === 'mitigation.failover')
  t.match(entry, { targets: ['primary'], to: 'dr', reason: 'primary region degraded', result: 'applied', id }, 'audited with its target')
  const samples = await scrape(s.ops)
  t.equal(sumOf(samples, 'breakwater_mitigations_total', { action: 'failover' }), 1, 'breakwater_mitigations_total{action="failover"}')
  t.equal(sumOf(samples, 'breakwater_failover_active', { upstream: 'primary' }), 1)

  const lifted = await run(['lift', id, '--reason', 'primary region back', '--json', '--admin', s.admin], withToken)
  t.equal(lifted.code, 0, lifted.stderr)
  t.match(parseOnlyJson(lifted), { id, status: 'lifted', liftReason: 'primary region back' })
  t.same(await servedBy(s), { body: 'primary', failover: undefined }, 'the primary serves again')
  t.match((await audit(s)).find((e) => e.action === 'mitigation.lift'), { id, restored: ['primary'] }, 'the lift says what it restored')

  // --to names any other upstream, not only the configured failover.
  const toSolo = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'failover', upstreams: ['primary'], to: 'solo', reason: 'dr is being patched' })
  t.equal(toSolo.status, 201, JSON.stringify(toSolo.body))
  t.same(await servedBy(s), { body: 'solo', failover: 'solo' })
})

t.test('two failovers of one upstream: lifting the older keeps the newer in force, lifting the newer restores the config', async (t) => {
  const { s } = await shop(t)
  const first = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'failover', upstreams: ['primary'], reason: 'first' })
  const second = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'failover', upstreams: ['primary'], to: 'solo', reason: 'second' })
  t.equal(second.status, 201)
  t.equal((await servedBy(s)).body, 'solo', 'the newest decides')
  const liftFirst = await admin(s.admin, 'DELETE', `/v1/mitigations/${first.body.id as string}`, { reason: 'done' })
  t.same(liftFirst.body.status, 'lifted')
  t.equal((await servedBy(s)).body, 'solo', 'the newer one still holds')
  await admin(s.admin, 'DELETE', `/v1/mitigations/${second.body.id as string}`, { reason: 'done' })
  t.same(await servedBy(s), { body: 'primary', failover: undefined }, 'then the config decides again')
})

t.test('a failover outlives a reload that removes its upstream: in force again when a reload brings it back, liftable meanwhile', async (t) => {
  const { s, input } = await shop(t)
  const reload = async (next: Record<string, unknown>): Promise<void> => {
    await s.sidecar.apply(resolveConfig(testSidecarInput(next, s.stateDir)).config)
  }
  const typed = input as { upstreams: Record<string, unknown>, routes: Array<Record<string, unknown>> }
  const { solo: _solo, ...upstreams } = typed.upstreams
  const withoutSolo = { ...input, upstreams, routes: [typed.routes[0], { ...typed.routes[1], upstream: 'dr' }] }

  const r = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'failover', upstreams: ['solo'], to: 'dr', reason: 'solo degraded' })
  t.equal(r.status, 201, JSON.stringify(r.body))
  t.same(await servedBy(s, '/other'), { body: 'dr', failover: 'dr' })
  await reload(withoutSolo)
  t.ok(s.logs.some((l) => l.event === 'override_kept' && l.upstream === 'solo' && l.failover === 'dr'), 'the kept failover is logged')
  await reload(input)
  t.same(await servedBy(s, '/other'), { body: 'dr', failover: 'dr' }, 'the reload that brings solo back finds its failover in force')
  t.equal(sumOf(await scrape(s.ops), 'breakwater_failover_active', { upstream: 'solo' }), 1)

  // Lifted while its upstream is gone: nothing comes back with it.
  await reload(withoutSolo)
  const lifted = await admin(s.admin, 'DELETE', `/v1/mitigations/${r.body.id as string}`, { reason: 'solo patched' })
  t.equal(lifted.body.status, 'lifted')
  await reload(input)
  t.same(await servedBy(s, '/other'), { body: 'solo', failover: undefined }, 'a failover lifted meanwhile stays lifted')
})

t.test('a failover with a ttl lapses on its own and the traffic returns', async (t) => {
  const { s } = await shop(t)
  const r = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'failover', upstreams: ['primary'], reason: 'short maintenance', ttl: '1s' })
  t.equal(r.status, 201, JSON.stringify(r.body))
  t.type(r.body.expiresAt, 'string', 'the record says when it lapses')
  t.equal((await servedBy(s)).body, 'dr')
  t.ok(await eventually(async () => (await servedBy(s)).body === 'primary', 30_000, 100), 'traffic returned after the ttl')
  const record = (await admin(s.admin, 'GET', `/v1/mitigations/${r.body.id as string}`)).body
  t.match(record, { status: 'lifted', liftReason: 'ttl expired' })
  // The expiry's audit line is written just after the change takes effect.
  t.ok(await eventually(async () => (await audit(s)).some((e) => e.action === 'mitigation.expire'), 30_000, 50), 'the expiry is audited')
  t.match((await audit(s)).find((e) => e.action === 'mitigation.expire'), { id: r.body.id, targets: ['primary'], mitigation: 'failover', requester: 'breakwater' })
  t.same((await admin(s.admin, 'GET', '/v1/state')).body.mitigations, [], 'no longer in force')
})

t.test('breakwater mitigate rateLimit: 429 beyond the burst; lift removes the limit', async (t) => {
  const { s } = await shop(t)
  const run = operator(t)
  const applied = await run(['mitigate', 'rateLimit', '--route', 'api', '--rps', '0.1', '--burst', '2', '--reason', 'traffic spike', '--ttl', '10m', '--admin', s.admin], withToken)
  t.equal(applied.code, 0, applied.stderr)
  const m = /mitigation (\S+): rateLimit applied — api at 0.1 req\/s \(burst 2\), until \S+/.exec(applied.stdout)
  t.ok(m, `the output says what it limits: ${applied.stdout}`)
  const id = m?.[1] ?? ''
  const statuses: number[] = []
  for (let i = 0; i < 5; i++) statuses.push((await send(s.proxy, `/api/${i}`)).status)
  t.same(statuses.slice(0, 2), [200, 200], 'the burst passes')
  t.ok(statuses.slice(2).every((x) => x === 429), `beyond it: 429 (${statuses.join(',')})`)
  const refused = await send(s.proxy, '/api/again')
  t.equal(refused.json().error, 'rate_limited')
  t.equal((await send(s.proxy, '/other')).status, 200, 'other routes are not limited')
  t.match((await audit(s)).find((e) => e.action === 'mitigation.rateLimit'), { id, targets: ['api'], limit: { requestsPerSecond: 0.1, burst: 2 } })
  t.equal(sumOf(await scrape(s.ops), 'breakwater_mitigations_total', { action: 'rateLimit' }), 1)

  const lifted = await run(['lift', id, '--reason', 'spike over', '--admin', s.admin], withToken)
  t.equal(lifted.code, 0, lifted.stderr)
  t.match(lifted.stdout, `mitigation ${id}: rateLimit lifted`)
  const after: number[] = []
  for (let i = 0; i < 6; i++) after.push((await send(s.proxy, `/api/after/${i}`)).status)
  t.same(after, [200, 200, 200, 200, 200, 200], 'no refusals once lifted')
})

t.test('failover and rate limit survive a restart with the same stateDir, and are liftable after it', async (t) => {
  const a = await shop(t)
  const failover = await admin(a.s.admin, 'POST', '/v1/mitigations', { action: 'failover', upstreams: ['primary'], reason: 'region down' })
  const limit = await admin(a.s.admin, 'POST', '/v1/mitigations', { action: 'rateLimit', routes: ['solo'], requestsPerSecond: 0.1, burst: 1, reason: 'spike' })
  t.equal(failover.status, 201)
  t.equal(limit.status, 201)
  t.equal(failover.body.persisted, true)
  await a.s.sidecar.close()

  const b = { s: await startTestSidecar(t, a.input) }
  t.same(await servedBy(b.s), { body: 'dr', failover: 'dr' }, 'the failover is in force again at start')
  t.same([(await send(b.s.proxy, '/x')).status, (await send(b.s.proxy, '/y')).status], [200, 429], 'so is the rate limit')
  t.ok(b.s.logs.some((l) => l.event === 'override_active' && l.id === failover.body.id), 'and the start says so in the log')
  const st = (await admin(b.s.admin, 'GET', '/v1/state')).body
  t.same(st.mitigations.map((m: any) => m.id).sort(), [failover.body.id, limit.body.id].sort())
  const lift = await admin(b.s.admin, 'DELETE', `/v1/mitigations/${failover.body.id as string}`, { reason: 'region back' })
  t.equal(lift.status, 200)
  t.same(await servedBy(b.s), { body: 'primary', failover: undefined }, 'lifted after the restart')
})

t.test('a failover to an upstream the config no longer has ends at start, audited, and the traffic stays home', async (t) => {
  const a = await shop(t)
  const r = await admin(a.s.admin, 'POST', '/v1/mitigations', { action: 'failover', upstreams: ['primary'], to: 'solo', reason: 'dr patched' })
  t.equal(r.status, 201)
  await a.s.sidecar.close()
  // The next config drops `solo` (its route now goes to dr).
  const input = a.input as { upstreams: Record<string, unknown>, routes: Array<Record<string, unknown>> }
  const { solo: _solo, ...upstreams } = input.upstreams
  const b = await startTestSidecar(t, { ...input, upstreams, routes: [input.routes[0], { ...input.routes[1], upstream: 'dr' }] })
  t.same(await servedBy(b), { body: 'primary', failover: undefined }, 'no failover to a missing upstream')
  const record = (await admin(b.admin, 'GET', `/v1/mitigations/${r.body.id as string}`)).body
  t.match(record, { status: 'lifted', liftReason: 'no longer configured: solo' })
  t.match((await audit(b)).find((e) => e.action === 'mitigation.expire'), { id: r.body.id, mitigation: 'failover' }, 'audited')
  t.same((await admin(b.admin, 'GET', '/v1/state')).body.mitigations, [])
})

t.test('bad input: a clear 400, nothing applied, and usage errors from the CLI', async (t) => {
  const { s } = await shop(t)
  const post = async (body: Record<string, unknown>): Promise<{ status: number, body: any }> => await admin(s.admin, 'POST', '/v1/mitigations', { reason: 'test', ...body })
  const cases: Array<[Record<string, unknown>, string, RegExp]> = [
    [{ action: 'failover', upstreams: ['nope'] }, 'unknown_upstream', /unknown upstream\(s\): nope/],
    [{ action: 'failover', upstreams: ['solo'] }, 'no_failover_target', /solo: no failover configured .*--to/],
    [{ action: 'failover', upstreams: ['primary'], to: 'primary' }, 'bad_request', /cannot fail over to itself/],
    [{ action: 'failover', upstreams: ['primary'], to: 'elsewhere' }, 'unknown_upstream', /to: unknown upstream "elsewhere"/],
    [{ action: 'failover' }, 'bad_request', /upstreams is required/],
    [{ action: 'rateLimit', routes: ['nope'], requestsPerSecond: 5 }, 'unknown_route', /unknown route\(s\): nope/],
    [{ action: 'rateLimit', routes: ['api'], requestsPerSecond: 0 }, 'bad_request', /requestsPerSecond must be a number above 0/],
    [{ action: 'rateLimit', routes: ['api'], requestsPerSecond: -3 }, 'bad_request', /above 0/],
    [{ action: 'rateLimit', routes: ['api'], requestsPerSecond: 'fast' }, 'bad_request', /above 0/],
    [{ action: 'rateLimit', routes: ['api'] }, 'bad_request', /above 0/],
    [{ action: 'rateLimit', routes: ['api'], requestsPerSecond: 5, burst: 0 }, 'bad_request', /burst must be/],
    [{ action: 'rateLimit', requestsPerSecond: 5 }, 'bad_request', /routes is required/],
    [{ action: 'rateLimit', routes: ['api'], requestsPerSecond: 5, ttl: 'soon' }, 'bad_request', /ttl must be/]
  ]
  for (const [body, error, message] of cases) {
    const r = await post(body)
    t.equal(r.status, 400, `${JSON.stringify(body)} → 400`)
    t.equal(r.body.error, error)
    t.match(r.body.message, message)
  }
  t.same((await admin(s.admin, 'GET', '/v1/state')).body.mitigations, [], 'nothing was applied')
  t.equal(s.logs.filter((l) => l.event === 'mitigation_refused').length, cases.length - 1, 'each refusal the control plane saw is logged (a bad ttl is refused before it)')
  t.match(s.logs.find((l) => l.event === 'mitigation_refused'), { action: 'failover', error: 'unknown_upstream', requester: '127.0.0.1' })
  t.equal((await send(s.proxy, '/api/x')).body, 'primary')

  const run = operator(t)
  const noRps = await run(['mitigate', 'rateLimit', '--route', 'api', '--reason', 'x', '--admin', s.admin], withToken)
  t.equal(noRps.code, 2, 'no --rps: a usage error')
  t.match(noRps.stderr, /--rps N/)
  const badRps = await run(['mitigate', 'rateLimit', '--route', 'api', '--rps', 'lots', '--reason', 'x', '--admin', s.admin], withToken)
  t.equal(badRps.code, 2)
  t.match(badRps.stderr, /--rps must be a number/)
  const noReason = await run(['failover', 'primary', '--admin', s.admin], withToken)
  t.equal(noReason.code, 2)
  t.match(noReason.stderr, /--reason/)
  const unknown = await run(['failover', 'nope', '--reason', 'x', '--admin', s.admin], withToken)
  t.equal(unknown.code, 1)
  t.match(unknown.stderr, /400 unknown_upstream.*nope/)
})

t.test('triage: failover for a failing upstream with a healthy failover; circuit break without one, or when the failover is down too', async (t) => {
  const withFailover = await shop(t)
  withFailover.primaryState.failing = true
  for (let i = 0; i < 20; i++) await send(withFailover.s.proxy, `/api/${i}`)
  for (let i = 0; i < 20; i++) await send(withFailover.s.proxy, `/ok/${i}`)
  let r = (await admin(withFailover.s.admin, 'GET', '/v1/triage')).body
  t.equal(r.scenario, 'downstream_failure')
  t.match(r.recommendation, { action: 'failover', target: 'primary', command: /^breakwater failover primary --to dr --reason / })
  t.match(r.recommendation.why, /dr is healthy/)
  const human = await operator(t)(['triage', '--admin', withFailover.s.admin], withToken)
  t.equal(human.code, 0, human.stderr)
  t.match(human.stdout, /DO\s+failover primary — /, 'breakwater triage says so')
  t.match(human.stdout, '$ breakwater failover primary --to dr --reason')

  // The failover's own circuit open: not healthy, so the next rung.
  t.equal((await admin(withFailover.s.admin, 'PUT', '/v1/circuits/dr', { state: 'open', reason: 'dr down too' })).status, 200)
  r = (await admin(withFailover.s.admin, 'GET', '/v1/triage')).body
  t.match(r.recommendation, { action: 'circuitBreak', target: 'primary' })
  t.match(r.recommendation.why, /failover dr is not healthy/)

  const without = await shop(t)
  without.soloState.failing = true
  for (let i = 0; i < 20; i++) await send(without.s.proxy, `/x/${i}`)
  for (let i = 0; i < 20; i++) await send(without.s.proxy, `/api/${i}`)
  r = (await admin(without.s.admin, 'GET', '/v1/triage')).body
  t.equal(r.scenario, 'downstream_failure')
  t.match(r.recommendation, { action: 'circuitBreak', target: 'solo', command: /^breakwater circuit solo open/ })
})
