/**
 * TLS (SPEC §18) over real sockets, with certificates each test generates: an HTTPS listener,
 * mutual TLS between two sidecars, certificate rotation without dropping a connection, and the
 * validate errors for missing, unreadable and mismatched files.
 */
import t, { type Test } from 'tap'
import net from 'node:net'
import tls from 'node:tls'
import https from 'node:https'
import { copyFileSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { Agent, request } from 'undici'
import { stringify } from 'yaml'
import { resolveConfig, ConfigError } from '../src/config/load.js'
import { createPki, type Pki } from './helpers/certificates.js'
import { startUpstream } from './helpers/upstream.js'
import { startTestSidecar, oneRoute } from './helpers/sidecar.js'
import { eventually, raw } from './helpers/http.js'
import { metricValue } from './helpers/metrics.js'
import { runCli } from './helpers/process.js'
import { admin } from './helpers/admin.js'
import { startOtlpReceiver } from './helpers/otlp.js'

const local = { host: '127.0.0.1', port: 0 }
const listen = (proxy: Record<string, unknown>, more: Record<string, unknown> = {}): Record<string, unknown> =>
  ({ listen: { proxy: { ...local, ...proxy }, ops: local, admin: local, ...more } })

/** An undici agent trusting `ca`, presenting `client` when given; closed in teardown. */
function agentFor (t: Test, ca: string, client?: { cert: string, key: string }): Agent {
  const agent = new Agent({ connect: { ca: readFileSync(ca), ...(client === undefined ? {} : { cert: readFileSync(client.cert), key: readFileSync(client.key) }) } })
  t.teardown(async () => { await agent.close() })
  return agent
}

/** A TLS connection to the listener, once its handshake is done. */
async function connectTls (t: Test, port: number, ca: string): Promise<tls.TLSSocket> {
  const socket = tls.connect({ host: '127.0.0.1', port, ca: readFileSync(ca), servername: 'localhost' })
  t.teardown(() => { socket.destroy() })
  await new Promise<void>((resolve, reject) => { socket.once('secureConnect', resolve); socket.once('error', reject) })
  return socket
}

/** The serial number of the certificate a new connection to the listener is shown. */
async function servedSerial (t: Test, port: number, ca: string): Promise<number> {
  const socket = await connectTls(t, port, ca)
  const serial = parseInt(socket.getPeerCertificate().serialNumber, 16)
  socket.destroy()
  return serial
}

/** One HTTP/1.1 request on an open connection; the response's status once its body is read. */
async function exchange (socket: tls.TLSSocket, path: string): Promise<number> {
  socket.write(`GET ${path} HTTP/1.1\r\nHost: localhost\r\n\r\n`)
  let text = ''
  return await new Promise((resolve, reject) => {
    const onData = (chunk: Buffer): void => {
      text += chunk.toString('latin1')
      const end = text.indexOf('\r\n\r\n')
      if (end < 0) return
      const length = Number(/\r\ncontent-length: *(\d+)/i.exec(text.slice(0, end))?.[1] ?? 0)
      if (text.length - end - 4 < length) return
      socket.off('data', onData)
      socket.off('error', reject)
      resolve(Number(text.slice(9, 12)))
    }
    socket.on('data', onData)
    socket.once('error', reject)
  })
}

/** Replace `target` whole by a rename, as a Secret volume update or `mv` does. */
function replace (from: string, target: string): void {
  copyFileSync(from, `${target}.new`)
  renameSync(`${target}.new`, target)
}

/**
 * A sidecar whose proxy listener serves `live.crt`/`live.key`, copied from the CA's certificate
 * serial 1001: the files a test rotates.
 */
async function startRotating (t: Test): Promise<{ pki: Pki, live: { cert: string, key: string }, app: Awaited<ReturnType<typeof startUpstream>>, sc: Awaited<ReturnType<typeof startTestSidecar>> }> {
  const pki = createPki(t)
  const first = pki.issue('first', 1001)
  const live = { cert: join(pki.dir, 'live.crt'), key: join(pki.dir, 'live.key') }
  copyFileSync(first.cert, live.cert)
  copyFileSync(first.key, live.key)
  const app = await startUpstream()
  t.teardown(app.close)
  const sc = await startTestSidecar(t, { ...oneRoute(app.url), ...listen({ tls: live }) })
  return { pki, live, app, sc }
}

t.test('a TLS listener serves HTTPS; the upstream sees x-forwarded-proto: https; a plain-HTTP client is counted', async (t) => {
  const pki = createPki(t)
  const server = pki.issue('server', 1)
  const app = await startUpstream()
  t.teardown(app.close)
  const receiver = await startOtlpReceiver()
  t.teardown(receiver.close)
  const sc = await startTestSidecar(t, { ...oneRoute(app.url), ...listen({ tls: server }), tracing: { otlpEndpoint: receiver.url, sampleRatio: 1, batch: { delayMs: 10 } } })
  t.match(sc.proxy, /^https:\/\/127\.0\.0\.1:\d+$/, 'the listening address says https')
  const res = await request(`${sc.proxy}/hello`, { dispatcher: agentFor(t, pki.ca) })
  t.equal(res.statusCode, 200)
  await res.body.dump()
  t.equal(app.received.at(-1)?.headers['x-forwarded-proto'], 'https', 'x-forwarded-proto is https')
  t.ok(await eventually(() => receiver.spans.length >= 1, 30_000), 'the request\'s span is exported')
  t.equal(receiver.spans[0]?.attributes['url.scheme'], 'https', 'its url.scheme is https')
  await raw(sc.proxyPort, 'GET / HTTP/1.1\r\nHost: a\r\n\r\n', 500)
  t.ok(await eventually(async () => await metricValue(sc.ops, 'breakwater_tls_handshake_failures_total', { listener: 'proxy' }) >= 1, 20_000), 'the failed handshake is counted')
  t.equal(app.received.length, 1, 'nothing of the plain-HTTP request reached the app')
})

t.test('a TCP port check (connect, then close without a byte) is not a failed handshake', async (t) => {
  const pki = createPki(t)
  const app = await startUpstream()
  t.teardown(app.close)
  const sc = await startTestSidecar(t, { ...oneRoute(app.url), ...listen({ tls: pki.issue('server', 1) }), logging: { level: 'debug', accessLog: false } })
  for (let i = 0; i < 3; i++) {
    const socket = net.connect(sc.proxyPort, '127.0.0.1')
    socket.on('error', () => {})
    await new Promise((resolve) => socket.once('connect', resolve))
    socket.end()
    await new Promise((resolve) => socket.once('close', resolve))
  }
  t.ok(await eventually(() => sc.logs.filter((l) => l.event === 'tls_port_check').length === 3, 20_000), 'each logged at debug as a port check')
  t.equal(await metricValue(sc.ops, 'breakwater_tls_handshake_failures_total', { listener: 'proxy' }), 0, 'none counted as a failed handshake')
  // A client that starts a handshake and leaves is one.
  await raw(sc.proxyPort, '\u0016\u0003\u0001\u0000', 300)
  t.ok(await eventually(async () => await metricValue(sc.ops, 'breakwater_tls_handshake_failures_total', { listener: 'proxy' }) === 1, 20_000), 'a handshake begun and dropped is counted')
})

t.test('limits.maxConnections on a TLS listener: the connection over the limit gets its 503 inside TLS', async (t) => {
  const pki = createPki(t)
  const app = await startUpstream()
  t.teardown(app.close)
  const sc = await startTestSidecar(t, { ...oneRoute(app.url), ...listen({ tls: pki.issue('server', 1) }), limits: { maxConnections: 1 } })
  const first = await connectTls(t, sc.proxyPort, pki.ca)
  t.equal(await exchange(first, '/one'), 200, 'the first connection is served')
  const second = await connectTls(t, sc.proxyPort, pki.ca)
  t.equal(await exchange(second, '/two'), 503, 'the second reads a 503 over its TLS session')
  t.equal(await exchange(first, '/again'), 200, 'the first still works')
  t.equal(app.received.length, 2, 'the refused request never reached the app')
})

t.test('a client that never starts its TLS handshake is closed after headersTimeoutMs and counted', async (t) => {
  const pki = createPki(t)
  const app = await startUpstream()
  t.teardown(app.close)
  const sc = await startTestSidecar(t, { ...oneRoute(app.url), ...listen({ tls: pki.issue('server', 1), headersTimeoutMs: 300 }) })
  const socket = net.connect(sc.proxyPort, '127.0.0.1')
  t.teardown(() => { socket.destroy() })
  socket.on('error', () => {})
  await new Promise((resolve) => socket.once('connect', resolve))
  await new Promise((resolve) => socket.once('close', resolve))
  t.pass('the silent connection was closed by the sidecar')
  t.ok(await eventually(async () => await metricValue(sc.ops, 'breakwater_tls_handshake_failures_total', { listener: 'proxy' }) >= 1, 20_000), 'and counted as a failed handshake')
})

t.test('mutual TLS between two sidecars: A\'s egress presents its client certificate to B, which refuses clients without one', async (t) => {
  const pki = createPki(t)
  const serverB = pki.issue('sidecar-b', 10)
  const clientA = pki.issue('sidecar-a', 11, 'client')
  const app = await startUpstream()
  t.teardown(app.close)
  const b = await startTestSidecar(t, { ...oneRoute(app.url), ...listen({ tls: { ...serverB, ca: pki.ca, requestClientCert: true } }) })
  const a = await startTestSidecar(t, {
    ...listen({}, { egress: local }),
    upstreams: { b: { url: b.proxy, tls: { ca: pki.ca, cert: clientA.cert, key: clientA.key } } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'b', listener: 'egress' }]
  })
  const egress = a.sidecar.addresses.egress as string
  for (let i = 0; i < 3; i++) {
    const res = await request(`${egress}/orders/${i}`)
    t.equal(res.statusCode, 200, `the app's call ${i} went A → B over mutual TLS`)
    await res.body.dump()
  }
  t.equal(app.received.length, 3, 'the app behind B got every call')
  t.equal(app.received[0]?.headers['x-forwarded-proto'], 'https', 'B saw them on its TLS listener')

  await t.rejects(request(`${b.proxy}/orders/x`, { dispatcher: agentFor(t, pki.ca) }), 'a client without a certificate is refused by B')
  const other = createPki(t, 'Other CA').issue('intruder', 12, 'client')
  await t.rejects(request(`${b.proxy}/orders/y`, { dispatcher: agentFor(t, pki.ca, other) }), 'a client certificate another CA signed is refused by B')
  t.equal(app.received.length, 3, 'no refused request reached the app')
  t.ok(await metricValue(b.ops, 'breakwater_tls_handshake_failures_total', { listener: 'proxy' }) >= 2, 'B counted both refusals')
  const res = await request(`${b.proxy}/orders/z`, { dispatcher: agentFor(t, pki.ca, clientA) })
  t.equal(res.statusCode, 200, 'a client with A\'s certificate is served')
  await res.body.dump()
})

t.test('an https:// upstream is verified: an untrusted server certificate, or no client certificate for a mutual-TLS upstream, is a 502', async (t) => {
  const pki = createPki(t)
  const app = await startUpstream()
  t.teardown(app.close)
  const b = await startTestSidecar(t, { ...oneRoute(app.url), ...listen({ tls: { ...pki.issue('sidecar-b', 20), ca: pki.ca, requestClientCert: true } }) })
  const client = pki.issue('sidecar-a', 21, 'client')
  const a = await startTestSidecar(t, {
    ...listen({}),
    upstreams: {
      untrusted: { url: b.proxy },
      anonymous: { url: b.proxy, tls: { ca: pki.ca } },
      // The certificate names 127.0.0.1 and localhost, not this name: verification fails.
      misnamed: { url: b.proxy, tls: { ca: pki.ca, ...client, servername: 'orders.example' } },
      unverified: { url: b.proxy, tls: { ...client, rejectUnauthorized: false } }
    },
    routes: ['untrusted', 'anonymous', 'misnamed', 'unverified'].map((name) => ({ match: { pathPrefix: `/${name}` }, upstream: name }))
  })
  for (const name of ['untrusted', 'anonymous', 'misnamed']) {
    const res = await request(`${a.proxy}/${name}`)
    t.equal(res.statusCode, 502, `${name}: 502`)
    await res.body.dump()
  }
  t.equal(app.received.length, 0, 'nothing reached the app behind B')
  const res = await request(`${a.proxy}/unverified`)
  t.equal(res.statusCode, 200, 'rejectUnauthorized: false connects to a certificate it cannot verify')
  await res.body.dump()
})

t.test('rotated certificate files: new connections get the new certificate, an open one keeps working; a bad pair keeps the old one', async (t) => {
  const { pki, live, sc } = await startRotating(t)

  const open = await connectTls(t, sc.proxyPort, pki.ca)
  t.equal(parseInt(open.getPeerCertificate().serialNumber, 16), 1001, 'the first certificate is served')
  t.equal(await exchange(open, '/before'), 200)

  const second = pki.issue('second', 2002)
  replace(second.key, live.key)
  replace(second.cert, live.cert)
  t.ok(await eventually(async () => await servedSerial(t, sc.proxyPort, pki.ca) === 2002, 30_000, 100), 'a new connection gets the new certificate')
  t.ok(sc.logs.some((l) => l.event === 'tls_reload' && l.result === 'ok' && l.serialNumber !== undefined), 'the reload is logged')
  t.equal(await exchange(open, '/after'), 200, 'the open keep-alive connection still serves requests')
  t.equal(parseInt(open.getPeerCertificate().serialNumber, 16), 1001, 'on the session it shook hands with')
  t.ok(await metricValue(sc.ops, 'breakwater_tls_certificate_reloads_total', { listener: 'proxy', result: 'ok' }) >= 1, 'the reload is counted')

  const refusedBefore = await metricValue(sc.ops, 'breakwater_tls_certificate_reloads_total', { listener: 'proxy', result: 'refused' })
  const third = pki.issue('third', 3003)
  replace(third.cert, live.cert) // the key is still the second's: they do not match
  t.ok(await eventually(async () => await metricValue(sc.ops, 'breakwater_tls_certificate_reloads_total', { listener: 'proxy', result: 'refused' }) > refusedBefore, 30_000, 100), 'the mismatched pair is refused and counted')
  const refusal = sc.logs.filter((l) => l.event === 'tls_reload' && l.result === 'refused').at(-1)
  t.equal(refusal?.level, 'error', 'logged at error')
  t.match(refusal?.problems, [/^listen\.proxy\.tls\.key: .* does not match the certificate/], 'an error log names the key')
  t.equal(await servedSerial(t, sc.proxyPort, pki.ca), 2002, 'new connections still get the last good certificate')
  t.equal(await exchange(open, '/still'), 200, 'and the open connection still works')
})

t.test('rotated to an expired certificate: refused and counted, new connections keep the valid one; validate warns about one at start', async (t) => {
  const { pki, live, app, sc } = await startRotating(t)
  t.equal(await servedSerial(t, sc.proxyPort, pki.ca), 1001, 'the valid certificate is served')

  const expired = pki.issueExpired('expired', 4004)
  replace(expired.key, live.key)
  replace(expired.cert, live.cert)
  t.ok(await eventually(async () => await metricValue(sc.ops, 'breakwater_tls_certificate_reloads_total', { listener: 'proxy', result: 'refused' }) >= 1, 30_000, 100), 'the expired pair is refused and counted')
  const refusal = sc.logs.filter((l) => l.event === 'tls_reload' && l.result === 'refused').at(-1)
  t.match(refusal?.problems, [/^listen\.proxy\.tls\.cert: .* expired on 2020-01-02/], 'an error log names the key and says it expired')
  t.equal(await servedSerial(t, sc.proxyPort, pki.ca), 1001, 'new connections still get the valid certificate')

  const config = join(pki.dir, 'expired.yaml')
  writeFileSync(config, stringify({ service: 'test', stateDir: join(pki.dir, 'state'), ...oneRoute(app.url), ...listen({ tls: expired }) }))
  const v = await runCli(['validate', '--config', config], { env: { BREAKWATER_CONFIG: undefined } })
  t.equal(v.code, 0, 'an expired certificate does not fail validate (a client that does not verify still gets through)')
  t.match(v.stderr, /warning: listen\.proxy\.tls\.cert: .*expired\.crt expired on 2020-01-02/, 'but validate warns, naming the key')
})

t.test('a CA bundle caught half-written is not applied: a rotated file is read once two checks see it the same', async (t) => {
  const pki = createPki(t)
  const partner = createPki(t, 'Partner CA')
  const server = pki.issue('server', 5005)
  const ours = pki.issue('ours', 51, 'client')
  const theirs = partner.issue('theirs', 52, 'client')
  const bundle = join(pki.dir, 'clients-ca.pem')
  const both = readFileSync(pki.ca, 'utf8') + readFileSync(partner.ca, 'utf8')
  writeFileSync(bundle, both)
  const app = await startUpstream()
  t.teardown(app.close)
  const sc = await startTestSidecar(t, { ...oneRoute(app.url), ...listen({ tls: { ...server, ca: bundle, requestClientCert: true } }) })
  // The checks, driven by hand: no timer decides when this test looks.
  const watcher = handDriven(sc)
  const served = servedOn(t, sc.proxy, pki.ca)
  t.ok(await served(theirs), 'the partner\'s client is served')

  // The bundle is rewritten in place and a check catches it with only the first CA in it.
  writeFileSync(bundle, readFileSync(pki.ca, 'utf8'))
  await watcher.poll()
  t.ok(await served(theirs), 'a check that sees the file changed does not apply it yet')
  writeFileSync(bundle, both)
  await watcher.poll()
  await watcher.poll()
  t.ok(await served(theirs), 'the whole bundle, seen twice, is applied: the partner is still served')
  t.ok(await served(ours), 'and so are our clients')

  // A change that stays is applied at the second check.
  writeFileSync(bundle, readFileSync(pki.ca, 'utf8'))
  await watcher.poll()
  await watcher.poll()
  t.notOk(await served(theirs), 'the partner\'s CA, removed for good, no longer admits its client')
  t.ok(await served(ours), 'ours still is')
})

t.test('a certificate file cut short is never applied, however long its writer paused: every PEM block must be whole', async (t) => {
  const pki = createPki(t)
  const partner = createPki(t, 'Partner CA')
  const server = pki.issue('server', 6006)
  const theirs = partner.issue('theirs', 62, 'client')
  const bundle = join(pki.dir, 'clients-ca.pem')
  const ours = readFileSync(pki.ca, 'utf8')
  const both = ours + readFileSync(partner.ca, 'utf8')
  writeFileSync(bundle, both)
  const live = { cert: join(pki.dir, 'live.crt'), key: join(pki.dir, 'live.key') }
  copyFileSync(server.cert, live.cert)
  copyFileSync(server.key, live.key)
  const app = await startUpstream()
  t.teardown(app.close)
  const sc = await startTestSidecar(t, { ...oneRoute(app.url), ...listen({ tls: { ...live, ca: bundle, requestClientCert: true } }) })
  const watcher = handDriven(sc)
  const served = servedOn(t, sc.proxy, pki.ca)
  const refusals = (): Array<Record<string, unknown>> => sc.logs.filter((l) => l.event === 'tls_reload' && l.result === 'refused')

  // A copy that stalled inside the partner's CA block: two checks see the same (short) file.
  writeFileSync(bundle, both.slice(0, ours.length + 120))
  await watcher.poll()
  await watcher.poll()
  t.ok(await served(theirs), 'the partner\'s client is still served: the cut bundle is not applied')
  t.match(refusals().at(-1)?.problems, [/^listen\.proxy\.tls\.ca: .* is cut short/], 'the refusal names the key and why')

  // A certificate chain that stalled inside the marker of its second block.
  writeFileSync(live.cert, readFileSync(server.cert, 'utf8') + '-----BEG')
  await watcher.poll()
  await watcher.poll()
  t.match(refusals().at(-1)?.problems, [/^listen\.proxy\.tls\.cert: .* is cut short/], 'a chain cut in a marker is refused too')

  // The writers finish: both files are whole and applied.
  writeFileSync(bundle, both)
  copyFileSync(server.cert, live.cert)
  await watcher.poll()
  await watcher.poll()
  t.ok(await served(theirs), 'the whole files are applied')
  t.ok(sc.logs.some((l) => l.event === 'tls_reload' && l.result === 'ok'), 'and the reload is logged')
})

/** The problems `resolveConfig` reports for `input` (fails the test when it accepts it). */
function problemsOf (t: Test, input: Record<string, unknown>): string[] {
  try {
    resolveConfig({ service: 'test', ...input })
  } catch (err) {
    t.type(err, ConfigError, 'a ConfigError')
    return [...(err as ConfigError).problems]
  }
  t.fail('the config was accepted')
  return []
}

t.test('an upstream\'s rotated client certificate is used for new connections without a reload; a bad pair keeps the old one', async (t) => {
  const pki = createPki(t)
  const server = pki.issue('app', 40)
  // The client certificate files A reads, replaced below as a Secret volume update would.
  const dir = join(pki.dir, 'a')
  mkdirSync(dir)
  const first = pki.issue('a-first', 41, 'client')
  const files = { cert: join(dir, 'tls.crt'), key: join(dir, 'tls.key') }
  copyFileSync(first.cert, files.cert)
  copyFileSync(first.key, files.key)
  // A real mutual-TLS app that says which client certificate each request came with, and
  // closes every connection after its answer, so each request shakes hands afresh.
  const serials: number[] = []
  const app = https.createServer({ key: readFileSync(server.key), cert: readFileSync(server.cert), ca: readFileSync(pki.ca), requestCert: true, rejectUnauthorized: true }, (req, res) => {
    serials.push(parseInt((req.socket as tls.TLSSocket).getPeerCertificate().serialNumber, 16))
    res.writeHead(200, { connection: 'close', 'content-type': 'text/plain' }).end('ok')
  })
  await new Promise<void>((resolve) => app.listen(0, '127.0.0.1', resolve))
  t.teardown(() => { app.closeAllConnections(); app.close() })
  const url = `https://127.0.0.1:${(app.address() as net.AddressInfo).port}`
  const a = await startTestSidecar(t, { ...oneRoute(url, {}, { tls: { ca: pki.ca, ...files } }), ...listen({}) })
  const call = async (path: string): Promise<number> => {
    const res = await request(`${a.proxy}${path}`)
    await res.body.dump()
    return res.statusCode
  }
  t.equal(await call('/before'), 200)
  t.same(serials, [41], 'the app saw the first client certificate')

  const second = pki.issue('a-second', 42, 'client')
  replace(second.key, files.key)
  replace(second.cert, files.cert)
  t.ok(await eventually(async () => { await call('/rotating'); return serials.at(-1) === 42 }, 20_000), 'a new connection presents the rotated certificate, no reload')
  t.ok(a.logs.some((l) => l.event === 'tls_reload' && l.upstream === 'app' && l.result === 'ok'), 'logged as a certificate reload of the upstream')
  t.equal(await metricValue(a.ops, 'breakwater_upstream_tls_certificate_reloads_total', { upstream: 'app', result: 'ok' }), 1, 'and counted')

  // A key that does not match the certificate: refused, the running pair stays in use.
  replace(first.key, files.key)
  t.ok(await eventually(() => a.logs.some((l) => l.event === 'tls_reload' && l.upstream === 'app' && l.result === 'refused'), 20_000), 'a mismatched pair is refused, with an error line')
  t.equal(await call('/after'), 200, 'requests go on')
  t.equal(serials.at(-1), 42, 'with the certificate in force before the bad files')
  // An alert can see a rotation that did not take, before the old certificate expires.
  t.equal(await metricValue(a.ops, 'breakwater_upstream_tls_certificate_reloads_total', { upstream: 'app', result: 'refused' }), 1, 'the refused files are counted')
})

t.test('verification reaches a mutual-TLS listener whose certificate a private CA signed: restored, synthetics answered 200', async (t) => {
  t.test('with the listener\'s own pair, when it allows client authentication', async (t) => {
    const pki = createPki(t, 'Private CA')
    await verifiedOverMutualTls(t, pki, pki.issue('sidecar', 50, 'both'), {})
  })
  t.test('with verification.clientCert, when the listener\'s certificate is for servers only', async (t) => {
    const pki = createPki(t, 'Private CA')
    await verifiedOverMutualTls(t, pki, pki.issue('sidecar', 52, 'server'), { clientCert: pki.issue('verifier', 53, 'client') })
  })
})

/** An operator's circuit break on `pay` while users browse the catalog over mutual TLS: verified restored. */
async function verifiedOverMutualTls (t: Test, pki: Pki, server: { cert: string, key: string }, verification: Record<string, unknown>): Promise<void> {
  const app = await startUpstream()
  t.teardown(app.close)
  const pay = await startUpstream()
  t.teardown(pay.close)
  const s = await startTestSidecar(t, {
    upstreams: { app: { url: app.url }, pay: { url: pay.url } },
    routes: [
      { name: 'pay', match: { pathPrefix: '/pay' }, upstream: 'pay' },
      { name: 'catalog', match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    // Restoration needs 10 real requests in the window: the users below send one every 100 ms or
    // slower, much slower on a busy machine; a 10 s window and a 60 s limit leave room for that.
    verification: { synthetics: [{ route: 'catalog', path: '/catalog/probe' }], intervalMs: 150, successes: 2, windowMs: '10s', timeoutMs: '60s', ...verification },
    ...listen({ tls: { ...server, ca: pki.ca, requestClientCert: true } })
  })
  const users = agentFor(t, pki.ca, pki.issue('user', 51, 'client'))
  const put = await admin(s.admin, 'PUT', '/v1/circuits/pay', { state: 'open', reason: 'pay failing' })
  t.equal(put.status, 200, 'a mitigation opens an incident to verify')
  // Real users of the catalog meanwhile, over mutual TLS.
  let flowing = true
  const traffic = (async () => {
    while (flowing) {
      const res = await request(`${s.proxy}/catalog/items`, { dispatcher: users })
      await res.body.dump()
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
  })()
  t.teardown(async () => { flowing = false; await traffic })
  let incident: any
  t.ok(await eventually(async () => {
    incident = (await admin(s.admin, 'GET', '/v1/incidents')).body.incidents[0]
    return incident !== undefined && incident.status !== 'verifying' && incident.status !== 'detected'
  }, 90_000, 100), 'the incident settles')
  flowing = false
  await traffic
  t.equal(incident?.status, 'restored', 'restored: the probes reached the listener')
  t.same(incident?.checks.lastSynthetic, [{ path: '/catalog/probe', status: 200, expected: 200 }], 'the last synthetic round was answered 200')
  t.ok(app.received.some((r) => r.url === '/catalog/probe'), 'the probe went through to the app')
}

t.test('bad TLS inputs are validate errors naming the key', async (t) => {
  const pki = createPki(t)
  const server = pki.issue('server', 1)
  const client = pki.issue('client', 2, 'client')
  const directory = join(pki.dir, 'a-directory')
  mkdirSync(directory)
  const route = oneRoute('http://127.0.0.1:1')
  const cases: Array<[string, Record<string, unknown>, RegExp]> = [
    ['a missing certificate', { ...route, ...listen({ tls: { cert: join(pki.dir, 'nope.crt'), key: server.key } }) }, /^listen\.proxy\.tls\.cert: .*nope\.crt does not exist$/],
    ['an unreadable key', { ...route, ...listen({ tls: { cert: server.cert, key: directory } }) }, /^listen\.proxy\.tls\.key: .*a-directory cannot be read/],
    ['a key of another certificate', { ...route, ...listen({ tls: { cert: server.cert, key: client.key } }) }, /^listen\.proxy\.tls\.key: .*client\.key does not match the certificate .*server\.crt$/],
    ['a file that is no certificate', { ...route, ...listen({ tls: { cert: server.key, key: server.key } }) }, /^listen\.proxy\.tls\.cert: .* is not a PEM certificate$/],
    ['requestClientCert without ca', { ...route, ...listen({ tls: { ...server, requestClientCert: true } }) }, /^listen\.proxy\.tls\.ca: needed with requestClientCert/],
    ['a missing egress certificate', { ...route, ...listen({}, { egress: { ...local, tls: { cert: join(pki.dir, 'gone.crt'), key: server.key } } }) }, /^listen\.egress\.tls\.cert: .*gone\.crt does not exist$/],
    ['tls on an http:// upstream', oneRoute('http://127.0.0.1:1', {}, { tls: { ca: pki.ca } }), /^upstreams\.app\.tls: set for plain http:\/\/ endpoints/],
    ['an upstream client key of another certificate', oneRoute('https://127.0.0.1:1', {}, { tls: { cert: client.cert, key: server.key } }), /^upstreams\.app\.tls\.key: .* does not match the certificate/],
    ['an upstream client certificate without its key', oneRoute('https://127.0.0.1:1', {}, { tls: { cert: client.cert } }), /^upstreams\.app\.tls: cert and key go together/],
    ['a missing upstream CA', oneRoute('https://127.0.0.1:1', {}, { tls: { ca: join(pki.dir, 'no-ca.crt') } }), /^upstreams\.app\.tls\.ca: .*no-ca\.crt does not exist$/],
    ['a verification client key of another certificate', { ...oneRoute('http://127.0.0.1:1'), verification: { clientCert: { cert: client.cert, key: server.key } } }, /^verification\.clientCert\.key: .* does not match the certificate/]
  ]
  for (const [what, input, expected] of cases) {
    const problems = problemsOf(t, input)
    t.ok(problems.some((p) => expected.test(p)), what, { problems })
  }
  t.doesNotThrow(() => resolveConfig({ service: 'test', ...oneRoute('https://127.0.0.1:1', {}, { tls: { ca: pki.ca, ...client } }), ...listen({ tls: { ...server, ca: pki.ca, requestClientCert: true } }) }), 'sound files are accepted')
})

t.test('validate: certificate paths are relative to the config file; a mismatched pair exits 1 naming the key', async (t) => {
  const pki = createPki(t)
  pki.issue('server', 1)
  pki.issue('client', 2, 'client')
  const config = (key: string): string => stringify({ service: 'test', ...oneRoute('http://127.0.0.1:1'), listen: { proxy: { tls: { cert: 'server.crt', key } } } })
  writeFileSync(join(pki.dir, 'good.yaml'), config('server.key'))
  writeFileSync(join(pki.dir, 'bad.yaml'), config('client.key'))
  const good = await runCli(['validate', '--config', join(pki.dir, 'good.yaml')], { env: { BREAKWATER_CONFIG: undefined } })
  t.equal(good.code, 0, 'a matching pair is valid', { stderr: good.stderr })
  const bad = await runCli(['validate', '--config', join(pki.dir, 'bad.yaml')], { env: { BREAKWATER_CONFIG: undefined } })
  t.equal(bad.code, 1, 'exit 1')
  t.match(bad.stderr, /^listen\.proxy\.tls\.key: .*client\.key does not match the certificate .*server\.crt$/m, 'the problem names the key')
})

/** The sidecar's certificate watcher, stopped: the test runs its checks by hand, no timer decides when. */
function handDriven (sc: Awaited<ReturnType<typeof startTestSidecar>>): { poll: () => Promise<void> } {
  const watcher = (sc.sidecar as unknown as { proxy: { certificates: { stop: () => void, poll: () => Promise<void> } } }).proxy.certificates
  watcher.stop()
  return watcher
}

/** Whether a TLS client with `client`'s certificate, trusting `ca`, is served 200 at `proxy`. */
function servedOn (t: Test, proxy: string, ca: string): (client: { cert: string, key: string }) => Promise<boolean> {
  return async (client) => {
    try {
      const res = await request(`${proxy}/x`, { dispatcher: agentFor(t, ca, client) })
      await res.body.dump()
      return res.statusCode === 200
    } catch {
      return false
    }
  }
}
