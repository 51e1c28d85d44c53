/**
 * With nothing listening on the app's port every request is a 502: the sidecar says so at
 * start and whenever it changes (a warn line, `/ready`'s `warnings`), without failing readiness.
 */
import t from 'tap'
import http from 'node:http'
import https from 'node:https'
import { readFileSync } from 'node:fs'
import type { AddressInfo } from 'node:net'
import { createPki } from './helpers/certificates.js'
import { refusedUrl, echo } from './helpers/upstream.js'
import { startTestSidecar, oneRoute } from './helpers/sidecar.js'
import { send, getJson, eventually } from './helpers/http.js'
import { metricValue, scrape, hasSample } from './helpers/metrics.js'

/** An echo app listening on `port` (a port the test chose earlier). */
async function listenOn (port: number): Promise<{ close: () => Promise<void> }> {
  const server = http.createServer((req, res) => echo(req, res, Buffer.alloc(0)))
  await new Promise<void>((resolve) => server.listen(port, '127.0.0.1', resolve))
  t.equal((server.address() as AddressInfo).port, port)
  return {
    close: async () => {
      server.closeAllConnections()
      await new Promise<void>((resolve) => server.close(() => resolve()))
    }
  }
}

t.test('an app that does not accept connections: a warning at start and in /ready, which stays 200; it clears when the app listens', async (t) => {
  const url = await refusedUrl()
  const port = Number(new URL(url).port)
  const s = await startTestSidecar(t, oneRoute(url))

  t.ok(await eventually(() => s.logs.some((l) => l.event === 'upstream_unreachable'), 10_000), 'a log line says the app is unreachable')
  const line = s.logs.find((l) => l.event === 'upstream_unreachable')
  t.equal(line?.level, 'warn')
  t.equal(line?.upstream, 'app', 'it names the upstream')
  t.equal(line?.endpoint, url, 'and its address')
  t.equal(line?.error, 'ECONNREFUSED')

  const ready = await getJson(`${s.ops}/ready`)
  t.equal(ready.status, 200, '/ready does not fail on the warning')
  t.equal(ready.body.status, 'ok')
  t.match(ready.body.warnings, [{ upstream: 'app', endpoint: url, error: 'ECONNREFUSED', message: /does not accept connections/ }], '/ready shows the warning')
  t.same(await getJson(`${s.ops}/health`), { status: 200, body: { status: 'ok' } }, '/health is unchanged')
  t.equal((await send(s.proxy, '/')).status, 502, 'requests fail meanwhile')
  t.equal(await metricValue(s.ops, 'breakwater_upstream_unreachable_endpoints', { upstream: 'app' }), 1, 'a gauge counts the unreachable endpoint')

  const app = await listenOn(port)
  t.teardown(app.close)
  t.ok(await eventually(async () => (await getJson(`${s.ops}/ready`)).body.warnings === undefined, 10_000), 'the warning clears once the app listens')
  t.same((await getJson(`${s.ops}/ready`)).body, { status: 'ok' })
  t.ok(s.logs.some((l) => l.event === 'upstream_reachable' && l.upstream === 'app' && l.level === 'info'), 'the recovery is logged')
  t.equal((await send(s.proxy, '/')).status, 200)
  t.ok(hasSample(await scrape(s.ops), 'breakwater_upstream_unreachable_endpoints', { upstream: 'app' }), 'the gauge stays, at 0')
  t.equal(await metricValue(s.ops, 'breakwater_upstream_unreachable_endpoints', { upstream: 'app' }), 0)
})

t.test('an app that stops accepting connections later is reported from real traffic, and clears when it is back', async (t) => {
  const url = await refusedUrl()
  const port = Number(new URL(url).port)
  let app = await listenOn(port)
  const s = await startTestSidecar(t, oneRoute(url))
  t.teardown(async () => await app.close())
  t.equal((await send(s.proxy, '/')).status, 200)
  t.notOk(s.logs.some((l) => l.event === 'upstream_unreachable'), 'no warning while the app listens')

  await app.close()
  t.equal((await send(s.proxy, '/')).status, 502, 'the app is gone')
  t.ok(await eventually(async () => (await getJson(`${s.ops}/ready`)).body.warnings?.[0]?.upstream === 'app', 10_000), '/ready warns')
  t.equal((await getJson(`${s.ops}/ready`)).status, 200)

  app = await listenOn(port)
  t.ok(await eventually(async () => (await getJson(`${s.ops}/ready`)).body.warnings === undefined, 10_000), 'the warning clears')
})

t.test('an https app whose certificate is not trusted does accept connections: its 502s are not reported as an unreachable app', async (t) => {
  const served = createPki(t).issue('app', 31)
  const trusted = createPki(t, 'Other CA')
  const server = https.createServer({ cert: readFileSync(served.cert), key: readFileSync(served.key) }, (req, res) => echo(req, res, Buffer.alloc(0)))
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(async () => {
    server.closeAllConnections()
    await new Promise<void>((resolve) => server.close(() => resolve()))
  })
  const url = `https://127.0.0.1:${(server.address() as AddressInfo).port}`
  const s = await startTestSidecar(t, oneRoute(url, {}, { tls: { ca: trusted.ca } }))

  for (let i = 0; i < 3; i++) t.equal((await send(s.proxy, '/')).status, 502, 'the certificate is refused: 502')
  // The start-up probe and the pool's reports have had their say once the third 502 is in.
  t.ok(await eventually(() => s.logs.filter((l) => l.msg === 'request').length === 3), 'the three requests are logged')
  t.notOk(s.logs.some((l) => l.event === 'upstream_unreachable'), 'no line says the app does not accept connections')
  t.same((await getJson(`${s.ops}/ready`)).body, { status: 'ok' }, '/ready carries no warning')
  t.equal(await metricValue(s.ops, 'breakwater_upstream_unreachable_endpoints', { upstream: 'app' }), 0, 'the gauge stays at 0')
})
