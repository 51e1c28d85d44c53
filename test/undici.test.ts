/**
 * Breakwater's undici (src/undici.ts): the dispatchers and `request` taken from undici's own
 * files, without the rest of its index, behave as undici's index does. Against a real
 * receiver on loopback.
 */
import t from 'tap'
import { Agent, Client, Pool, buildConnector, request } from '../src/undici.js'
import * as whole from 'undici'
import { startReceiver } from './helpers/receiver.js'

t.test('request: method, path and query, headers and body reach the server; the answer comes back', async (t) => {
  const receiver = await startReceiver([201])
  t.teardown(receiver.close)
  receiver.answer = (d) => ({ seen: d.url })
  const res = await request(`${receiver.url}/hooks/rollback?service=checkout&x=1`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-request-id': 'r-1' },
    body: JSON.stringify({ action: 'rollback' })
  })
  t.equal(res.statusCode, 201)
  t.same(await res.body.json(), { seen: '/hooks/rollback?service=checkout&x=1' })
  const d = receiver.deliveries[0]
  t.equal(d?.method, 'POST')
  t.equal(d?.headers['x-request-id'], 'r-1')
  t.same(d?.body, { action: 'rollback' })
})

t.test('request: GET without a body, PUT with one when no method is given (as undici)', async (t) => {
  const receiver = await startReceiver()
  t.teardown(receiver.close)
  await (await request(`${receiver.url}/a`)).body.dump()
  await (await request(new URL(`${receiver.url}/b`), { body: 'x' })).body.dump()
  await (await request(`${receiver.url}/c`, { body: '' })).body.dump()
  t.same(receiver.deliveries.map((d) => `${d.method} ${d.url}`), ['GET /a', 'PUT /b', 'GET /c'], 'an empty body counts as none')
})

t.test('request: on the dispatcher given, else the global one', async (t) => {
  const receiver = await startReceiver()
  t.teardown(receiver.close)
  let dispatched = 0
  const agent = new Agent()
  t.teardown(async () => { await agent.close() })
  const counting = agent.compose((dispatch) => (opts, handler) => { dispatched++; return dispatch(opts, handler) })
  await (await request(`${receiver.url}/via`, { dispatcher: counting })).body.dump()
  t.equal(dispatched, 1, 'the dispatcher given carried it')
  await (await request(`${receiver.url}/global`)).body.dump()
  t.equal(dispatched, 1, 'without one, the global dispatcher did')
  t.equal(whole.getGlobalDispatcher().constructor.name, 'Agent')
  t.equal(receiver.deliveries.length, 2)
})

t.test('request: a URL that is not http(s) is refused with undici\'s own error', async (t) => {
  await t.rejects(async () => await request('ftp://127.0.0.1/x'), { code: 'UND_ERR_INVALID_ARG' })
  await t.rejects(async () => await request('not a url'), /Invalid URL/)
})

t.test('the dispatchers are undici\'s own classes, with its request API on them', async (t) => {
  const receiver = await startReceiver()
  t.teardown(receiver.close)
  t.equal(Pool, whole.Pool)
  t.equal(Client, whole.Client)
  t.equal(Agent, whole.Agent)
  t.equal(buildConnector, whole.buildConnector)
  const pool = new Pool(receiver.url, { connections: 1 })
  t.teardown(async () => { await pool.close() })
  const res = await pool.request({ path: '/pooled', method: 'GET' })
  t.equal(res.statusCode, 200)
  await res.body.dump()
  t.equal(receiver.deliveries[0]?.url, '/pooled')
})
