/**
 * The hostile-client corpus (SPEC §15): whatever a client sends or does — smuggling variants,
 * `Expect`, duplicate and oversized headers, aborts at every phase, slow and non-reading
 * clients — it never opens a circuit, never ejects an endpoint and never moves a trigger.
 * Only the upstream can fail the upstream. The last test is the control: the same harness
 * sees real upstream failures open the circuit and fire the trigger, so the corpus test can fail.
 */
import t, { type Test } from 'tap'
import type http from 'node:http'
import { startUpstream, type TestUpstream } from './helpers/upstream.js'
import { startTestSidecar, type TestSidecar } from './helpers/sidecar.js'
import { WireClient } from './helpers/wire.js'
import { admin } from './helpers/admin.js'
import { metricValue } from './helpers/metrics.js'
import { send, sleep, eventually } from './helpers/http.js'
import { SMUGGLING_CASES } from './helpers/smuggling.js'

const VOLUME = 3
/** `/big` in 64 KiB chunks: 64 MiB. */
const BIG_CHUNKS = 1024

interface Farm {
  ups: TestUpstream[]
  /** Responses the upstreams really started (a client that left first gets none). */
  answered: () => number
  /** Status every plain request gets from now on. */
  setStatus: (code: number) => void
}

/**
 * Two real endpoints: `/slow` answers after 1.5 s, `/big` streams 64 MiB as fast as it is read
 * (more than loopback's socket buffers hold, so a client that never reads stalls it), anything
 * else `status`.
 */
async function farm (t: Test): Promise<Farm> {
  let status = 200
  let answered = 0
  const handler = (req: http.IncomingMessage, res: http.ServerResponse): void => {
    const answer = (): void => {
      if (res.destroyed) return
      answered++
      if (req.url === '/big') {
        res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(BIG_CHUNKS * 64 * 1024) })
        const chunk = Buffer.alloc(64 * 1024, 120)
        let sent = 0
        const pump = (): void => {
          while (sent < BIG_CHUNKS && !res.destroyed) {
            sent++
            if (!res.write(chunk)) { res.once('drain', pump); return }
          }
          if (sent >= BIG_CHUNKS) res.end()
        }
        pump()
        return
      }
      res.writeHead(status, { 'content-type': 'text/plain' })
      res.end(`upstream ${status}`)
    }
    if (req.url === '/slow') setTimeout(answer, 1500)
    else answer()
  }
  const ups = [await startUpstream(handler), await startUpstream(handler)]
  for (const up of ups) t.teardown(up.close)
  return { ups, answered: () => answered, setStatus: (code) => { status = code } }
}

function config (f: Farm): Record<string, unknown> {
  return {
    upstreams: {
      app: {
        endpoints: f.ups.map((u) => u.url),
        ejection: { consecutiveFailures: 2 }
      }
    },
    routes: [{ name: 'all', match: { pathPrefix: '/' }, upstream: 'app', idleTimeoutMs: 400 }],
    circuitBreakers: { app: { volumeThreshold: VOLUME, failureThreshold: 0.5, rollingWindowMs: 60_000 } },
    rollbackTriggers: [{ name: 'app_errors', metric: 'error_rate', threshold: 0.01, window: '1m', minRequests: 1, action: 'notify' }]
  }
}

/** The first response is in: its body complete by Content-Length or by its last chunk, or the connection closed. */
function firstResponseIn (c: WireClient): boolean {
  const end = c.received.indexOf('\r\n\r\n')
  if (end === -1) return c.closed
  const head = c.received.slice(0, end)
  const length = /\r\ncontent-length:\s*(\d+)/i.exec(head)
  if (length !== null) return c.received.length >= end + 4 + Number(length[1])
  if (/\r\ntransfer-encoding:\s*chunked/i.test(head)) return c.received.startsWith('0\r\n\r\n', end + 4) || c.received.includes('\r\n0\r\n\r\n', end + 4)
  return c.closed
}

/** Send `bytes` on a fresh connection, then wait (bounded) for a first answer or the close. */
async function hit (port: number, bytes: string | Buffer, then: 'wait' | 'close' = 'wait', waitMs = 1500): Promise<string> {
  const c = await WireClient.connect(port)
  c.write(bytes)
  if (then === 'close') {
    await sleep(20)
    c.destroy()
    return ''
  }
  try {
    await c.until(firstResponseIn, waitMs, 'a response')
  } catch {}
  c.destroy()
  return c.received
}

const head = (lines: string[]): string => lines.join('\r\n') + '\r\n\r\n'

/** Requests a client can write that are malformed, ambiguous or smuggling attempts. */
const SMUGGLING: Array<[string, string]> = [
  ['CL + TE', head(['POST / HTTP/1.1', 'Host: a', 'Content-Length: 4', 'Transfer-Encoding: chunked']) + '0\r\n\r\n'],
  ['two different Content-Length', head(['POST / HTTP/1.1', 'Host: a', 'Content-Length: 4', 'Content-Length: 5']) + 'abcde'],
  ['Content-Length list', head(['POST / HTTP/1.1', 'Host: a', 'Content-Length: 4, 5']) + 'abcde'],
  ['TE xchunked', head(['POST / HTTP/1.1', 'Host: a', 'Transfer-Encoding: xchunked']) + '0\r\n\r\n'],
  ['TE chunked, identity', head(['POST / HTTP/1.1', 'Host: a', 'Transfer-Encoding: chunked, identity']) + '0\r\n\r\n'],
  ['space before colon', head(['POST / HTTP/1.1', 'Host: a', 'Transfer-Encoding : chunked']) + '0\r\n\r\n'],
  ['obs-fold TE', head(['POST / HTTP/1.1', 'Host: a', 'Transfer-Encoding:', ' chunked']) + '0\r\n\r\n'],
  ['bad chunk size', head(['POST / HTTP/1.1', 'Host: a', 'Transfer-Encoding: chunked']) + 'zz\r\nabc\r\n0\r\n\r\n'],
  ['chunk size overflow', head(['POST / HTTP/1.1', 'Host: a', 'Transfer-Encoding: chunked']) + 'ffffffffffffffffff\r\nabc\r\n0\r\n\r\n'],
  ['negative Content-Length', head(['POST / HTTP/1.1', 'Host: a', 'Content-Length: -1'])],
  ['bare LF', 'GET / HTTP/1.1\nHost: a\n\n'],
  ['NUL in a header value', head(['GET / HTTP/1.1', 'Host: a', 'X-A: b\u0000c'])],
  ['CR in a header value', head(['GET / HTTP/1.1', 'Host: a', 'X-A: b\rc'])],
  ['HTTP/1.0 chunked', head(['POST / HTTP/1.0', 'Host: a', 'Transfer-Encoding: chunked']) + '0\r\n\r\n'],
  ['no Host in HTTP/1.1', head(['GET / HTTP/1.1'])],
  ['two Host headers', head(['GET / HTTP/1.1', 'Host: a', 'Host: b'])],
  ['absolute-form to elsewhere', head(['GET http://elsewhere.example/ HTTP/1.1', 'Host: a'])],
  ['invalid percent-encoding', head(['GET /%zz HTTP/1.1', 'Host: a'])],
  ['unknown method', head(['FROBNICATE / HTTP/1.1', 'Host: a'])],
  ['CONNECT', head(['CONNECT elsewhere.example:443 HTTP/1.1', 'Host: elsewhere.example:443'])],
  ['Expect: something else', head(['POST / HTTP/1.1', 'Host: a', 'Expect: 200-ok', 'Content-Length: 2']) + 'hi'],
  ['Connection names a short header', head(['GET / HTTP/1.1', 'Host: a', 'Connection: x-api-key', 'X-Api-Key: secret'])],
  ['2,100 headers', head(['GET / HTTP/1.1', 'Host: a', ...Array.from({ length: 2100 }, (_, i) => `X-H${i}: v`)])],
  ['a 70 KiB header', head(['GET / HTTP/1.1', 'Host: a', `X-Big: ${'a'.repeat(70 * 1024)}`])],
  ['pipelined after Connection: close', head(['GET / HTTP/1.1', 'Host: a', 'Connection: close']) + head(['GARBAGE'])],
  ['upgrade to an unknown protocol', head(['GET / HTTP/1.1', 'Host: a', 'Connection: upgrade', 'Upgrade: h2c'])],
  ['WebSocket upgrade without a key', head(['GET / HTTP/1.1', 'Host: a', 'Connection: upgrade', 'Upgrade: websocket'])]
]

async function assertUntouched (t: Test, s: TestSidecar, f: Farm, what: string): Promise<void> {
  const circuit = s.sidecar.dataPlane.circuit('app')
  t.ok(circuit !== undefined, 'the upstream has a breaker')
  if (circuit === undefined) return
  t.equal(circuit.state, 'closed', `${what}: the circuit stays closed`)
  t.equal(circuit.failureRate, 0, `${what}: the breaker saw no failure`)
  t.ok(circuit.windowRequests <= f.answered(), `${what}: the breaker counted only requests the upstream answered (${circuit.windowRequests} ≤ ${f.answered()})`)
  t.equal(await metricValue(s.ops, 'breakwater_circuit_transitions_total'), 0, `${what}: no circuit transition`)
  t.equal(await metricValue(s.ops, 'breakwater_ejections_total'), 0, `${what}: no endpoint ejected`)
  t.equal(await metricValue(s.ops, 'breakwater_trigger_fired_total'), 0, `${what}: the trigger never fired`)
  const state = await admin(s.admin, 'GET', '/v1/state')
  const trigger = (state.body.triggers as Array<{ name: string, errors: number, value: number | null }>).find((x) => x.name === 'app_errors')
  t.ok(trigger !== undefined, 'the trigger is in the state view')
  t.equal(trigger?.errors ?? -1, 0, `${what}: no error in the trigger's window`)
}

t.test('no client behaviour changes a circuit, an ejection or a trigger', async (t) => {
  const f = await farm(t)
  const s = await startTestSidecar(t, config(f))
  const port = s.proxyPort

  // A healthy baseline: the upstream answers, nothing is wrong.
  for (let i = 0; i < 2; i++) t.equal((await send(s.proxy, '/')).status, 200)

  // Beside these, every variant of the smuggling corpus (its verdicts: smuggling.test.ts).
  for (const [name, bytes] of [...SMUGGLING, ...SMUGGLING_CASES.map((c) => [c.name, c.bytes] as const)]) {
    const reply = await hit(port, bytes)
    t.notMatch(reply, /^HTTP\/1\.1 50[24]/, `${name}: never answered as an upstream failure`)
  }
  await assertUntouched(t, s, f, 'smuggling and malformed input')

  // Expect: 100-continue, as curl sends it for uploads: the upload works.
  for (let i = 0; i < 3; i++) {
    const c = await WireClient.connect(port)
    c.write(head(['POST /upload HTTP/1.1', 'Host: a', 'Expect: 100-continue', 'Content-Length: 5']))
    await c.until((x) => x.received.includes('100 Continue') || x.received.includes('\r\n\r\n'), 3000, '100 Continue or an answer').catch(() => {})
    c.write('hello')
    await c.until((x) => /HTTP\/1\.1 [2-5]\d\d (?!Continue)/.test(x.received) || x.closed, 3000, 'the final answer').catch(() => {})
    t.match(c.received, /HTTP\/1\.1 200 OK/, 'Expect: 100-continue upload answered 200 by the upstream')
    c.destroy()
  }
  await assertUntouched(t, s, f, 'Expect: 100-continue')

  // Aborts at every phase, each repeated past the breaker's volume threshold.
  for (let i = 0; i < VOLUME + 2; i++) {
    await hit(port, 'GET / HT', 'close') // inside the request line
    await hit(port, head(['POST / HTTP/1.1', 'Host: a', 'Content-Length: 100']), 'close') // head sent, no body
    await hit(port, head(['POST / HTTP/1.1', 'Host: a', 'Content-Length: 100']) + 'x'.repeat(50), 'close') // half a body
    await hit(port, head(['POST / HTTP/1.1', 'Host: a', 'Transfer-Encoding: chunked']) + '5\r\nhello\r\n', 'close') // chunked, unfinished
    // Waiting for the response: the client gives up while the upstream is still working.
    const waiting = await WireClient.connect(port)
    waiting.write(head(['GET /slow HTTP/1.1', 'Host: a']))
    await sleep(100)
    waiting.destroy()
    // Mid-response: the client reads a little of a large body and leaves.
    const reading = await WireClient.connect(port)
    reading.write(head(['GET /big HTTP/1.1', 'Host: a']))
    await reading.until((x) => x.received.length > 1000, 3000, 'the first bytes of /big').catch(() => {})
    reading.destroy()
    // fetch() aborted by its AbortController while waiting for /slow.
    const ac = new AbortController()
    const pending = fetch(`${s.proxy}/slow`, { signal: ac.signal }).catch(() => null)
    await sleep(100)
    ac.abort()
    await pending
  }
  await eventually(() => s.sidecar.dataPlane.stats.inFlight === 0, 5000)
  await assertUntouched(t, s, f, 'aborts at every phase')

  // Slow clients: a trickling upload that stalls, and a client that never reads.
  for (let i = 0; i < VOLUME + 2; i++) {
    const trickle = await WireClient.connect(port)
    trickle.write(head(['POST / HTTP/1.1', 'Host: a', 'Content-Length: 1000']) + 'abc')
    await trickle.until((x) => x.closed || x.received.length > 0, 5000, 'the idle upload to be cut').catch(() => {})
    trickle.destroy()
  }
  // A client that asks for 64 MiB and never reads: the upstream answers, the response stalls
  // on the client's full socket, and the client is cut after idleTimeoutMs as a slow client.
  const slowClients = async (): Promise<number> => await metricValue(s.ops, 'breakwater_client_errors_total', { error: 'slow_client' })
  for (let i = 0; i < VOLUME + 2; i++) {
    const before = await slowClients()
    const answeredBefore = f.answered()
    const stalled = await WireClient.connect(port)
    stalled.socket.pause()
    stalled.write(head(['GET /big HTTP/1.1', 'Host: a']))
    t.ok(await eventually(() => f.answered() > answeredBefore, 5000), 'the upstream started answering /big to a client that never reads')
    t.ok(await eventually(async () => await slowClients() > before, 5000), 'the stalled response cut the client as a slow client')
    stalled.destroy()
  }
  await eventually(() => s.sidecar.dataPlane.stats.inFlight === 0, 5000)
  await assertUntouched(t, s, f, 'slow and non-reading clients')

  t.equal((await send(s.proxy, '/')).status, 200, 'the upstream is still served')
})

t.test('control: the same harness sees real upstream failures', async (t) => {
  const f = await farm(t)
  const s = await startTestSidecar(t, config(f))
  f.setStatus(500)
  for (let i = 0; i < VOLUME + 1; i++) await send(s.proxy, '/')
  t.equal(s.sidecar.dataPlane.circuit('app')?.state, 'open', 'upstream 500s open the circuit')
  t.ok(await eventually(async () => await metricValue(s.ops, 'breakwater_trigger_fired_total') === 1, 5000), 'and fire the trigger')
  t.ok(await metricValue(s.ops, 'breakwater_ejections_total') >= 1, 'and eject an endpoint')
})
