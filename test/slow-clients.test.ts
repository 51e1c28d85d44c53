import t from 'tap'
import net from 'node:net'
import { once } from 'node:events'
import { Readable } from 'node:stream'
import type { Test } from 'tap'
import type { Dispatcher } from 'undici'
import { startUpstream, echo, type Handler } from './helpers/upstream.js'
import { startTestSidecar, oneRoute, type TestSidecar } from './helpers/sidecar.js'
import { send, eventually } from './helpers/http.js'
import { scrape, sumOf } from './helpers/metrics.js'

/** `/big` streams 64 MiB, produced only as fast as it is read; everything else is echoed. */
const bigOrEcho: Handler = (req, res, body) => {
  if (req.url !== '/big') { echo(req, res, body); return }
  let left = 1024
  const chunk = Buffer.alloc(64 * 1024, 'b')
  res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(left * chunk.length) })
  Readable.from((function * () { while (left-- > 0) yield chunk })()).pipe(res)
}

/** A raw connection that sends `head` (and `body`) and then never reads a byte. */
async function nonReader (t: Test, port: number, request: string): Promise<net.Socket> {
  const socket = net.connect(port, '127.0.0.1')
  socket.on('error', () => {})
  await once(socket, 'connect')
  socket.pause()
  socket.write(request)
  t.teardown(() => { socket.destroy() })
  return socket
}

/** A client uploading `length` bytes 10 at a time every `everyMs`; it reads nothing. */
async function trickler (t: Test, port: number, length: number, everyMs: number): Promise<net.Socket> {
  const socket = await nonReader(t, port, `POST /upload HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\nContent-Length: ${length}\r\n\r\n`)
  const timer = setInterval(() => { if (!socket.destroyed) socket.write('0123456789') }, everyMs)
  socket.on('close', () => clearInterval(timer))
  t.teardown(() => clearInterval(timer))
  return socket
}

t.test('slow uploaders and non-reading clients do not starve an upstream of connections', async (t) => {
  const up = await startUpstream(bigOrEcho)
  t.teardown(up.close)
  // A pool of 8 connections (`upstreams.X.connections`, 128 by default) to make the scale small.
  const bw = await startTestSidecar(t, oneRoute(up.url, { name: 'r' }, { connections: 8 }))
  const slow: net.Socket[] = []
  // 20 uploads trickling 10 bytes a second: small bodies are read whole before dispatch.
  for (let i = 0; i < 20; i++) slow.push(await trickler(t, bw.proxyPort, 1000, 1000))
  // 20 clients that ask for a large response and never read it.
  for (let i = 0; i < 20; i++) slow.push(await nonReader(t, bw.proxyPort, 'GET /big HTTP/1.1\r\nHost: a\r\n\r\n'))
  // 4 uploads too large to buffer, trickling 10 bytes every 2 s: silent for twice the grace
  // given once half of the pool waits on clients.
  for (let i = 0; i < 4; i++) slow.push(await trickler(t, bw.proxyPort, 1024 * 1024, 2000))
  t.ok(await eventually(() => up.received.filter((r) => r.url === '/big').length >= 8, 20_000), 'the non-reading clients reached the upstream')

  // Everyone else still gets through, in parallel, well before any idle timeout (60 s).
  const others = await Promise.all(Array.from({ length: 10 }, async (_, i) => await send(bw.proxy, `/other/${i}`, { method: i % 2 === 0 ? 'GET' : 'POST', body: i % 2 === 0 ? undefined : 'small order' })))
  t.same(others.map((r) => r.status), Array(10).fill(200), '10 of 10 other requests answered')
  t.ok(slow.filter((s) => !s.destroyed).length > 0, 'while slow clients are still connected')

  const samples = await scrape(bw.ops)
  t.ok(sumOf(samples, 'breakwater_client_errors_total', { error: 'slow_client' }) > 0, 'stalled clients past half of the pool were disconnected, and counted')
})

t.test('routes[].idleTimeoutMs bounds a stalled client either way', async (t) => {
  const up = await startUpstream(bigOrEcho)
  t.teardown(up.close)
  const bw = await startTestSidecar(t, oneRoute(up.url, { name: 'r', idleTimeoutMs: 300 }))
  const cut = (): number => bw.sidecar.dataPlane.stats.clientErrors.get('slow_client') ?? 0

  t.test('an upload that stops half way', async (t) => {
    const before = cut()
    await nonReader(t, bw.proxyPort, 'POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nten bytes.')
    t.ok(await eventually(() => cut() > before, 10_000), 'the client is disconnected')
    t.equal(up.received.filter((r) => r.url === '/upload').length, 0, 'the upstream never saw a partial body')
  })

  t.test('a small upload that trickles, never silent for idleTimeoutMs, must arrive whole within it', async (t) => {
    const before = cut()
    await trickler(t, bw.proxyPort, 1000, 50) // 10 bytes every 50 ms: 5 s for the whole body
    t.ok(await eventually(() => cut() > before, 10_000), 'the client is disconnected')
    t.equal(up.received.filter((r) => r.url === '/upload').length, 0, 'the upstream never saw it')
  })

  t.test('an upload too large to buffer that stops half way', async (t) => {
    const before = cut()
    await nonReader(t, bw.proxyPort, `POST /large HTTP/1.1\r\nHost: a\r\nContent-Length: ${1024 * 1024}\r\n\r\n${'x'.repeat(1000)}`)
    t.ok(await eventually(() => cut() > before, 10_000), 'the client is disconnected')
    t.ok(await eventually(() => bw.sidecar.dataPlane.stats.inFlight === 0, 10_000), 'the exchange ended (its upstream request aborted)')
  })

  t.test('a client that stops reading the response', async (t) => {
    const before = cut()
    await nonReader(t, bw.proxyPort, 'GET /big HTTP/1.1\r\nHost: a\r\n\r\n')
    t.ok(await eventually(() => cut() > before, 10_000), 'the client is disconnected')
    t.ok(await eventually(() => bw.sidecar.dataPlane.stats.inFlight === 0, 10_000), 'the upstream response is aborted')
  })

  t.test('a request waiting for a slow upstream is not a stalled client', async (t) => {
    const slowUp = await startUpstream((req, res, body) => { setTimeout(() => echo(req, res, body), 800) })
    t.teardown(slowUp.close)
    const slowBw = await startTestSidecar(t, oneRoute(slowUp.url, { idleTimeoutMs: 300 }))
    t.equal((await send(slowBw.proxy, '/wait')).status, 200, 'answered after 800 ms although idleTimeoutMs is 300')
  })

  // The sidecar, its upstream and this client share one process: blocking it stands for a stall
  // of the sidecar's own event loop (a long collection, a throttled CPU). A client's bytes
  // written just before are in the kernel on time, and read by the sidecar only after it.
  const stall = (ms: number): void => {
    const until = performance.now() + ms
    while (performance.now() < until);
  }

  interface Pieces {
    /**
     * Where to send them: by default a fresh sidecar whose route has idleTimeoutMs 1000, ten times
     * the pieces' 100 ms: the client shares this process with the sidecar, and on a starved host its
     * own timers run late, which a shorter limit would read as the client's silence.
     */
    sidecar?: TestSidecar
    /** How long each stall lasts: past idleTimeoutMs (1.5 s) by default. */
    stallMs?: number
    /** The Content-Length declared, when the pieces are to leave the body unfinished. */
    length?: number
  }

  /**
   * POST `pieces` 100 ms apart, each after checking the client is still connected, stalling
   * after those in `stallAfter`; resolves once the connection closes.
   */
  async function sendPieces (t: Test, pieces: string[], stallAfter: number[], options: Pieces = {}): Promise<{ answer: string, cut: number }> {
    const sidecar = options.sidecar ?? await startTestSidecar(t, oneRoute(up.url, { idleTimeoutMs: 1000 }))
    const socket = net.connect(sidecar.proxyPort, '127.0.0.1')
    t.teardown(() => { socket.destroy() })
    await once(socket, 'connect')
    let answer = ''
    socket.setEncoding('latin1')
    socket.on('data', (chunk: string) => { answer += chunk })
    socket.on('error', () => {}) // a cut shows in the answer and the count
    const length = options.length ?? pieces.reduce((n, p) => n + p.length, 0)
    socket.write(`POST /pieces HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\nContent-Length: ${length}\r\nConnection: close\r\n\r\n`)
    for (const [i, piece] of pieces.entries()) {
      await new Promise((resolve) => setTimeout(resolve, 100))
      t.equal(socket.destroyed, false, `still connected before piece ${i + 1}`)
      if (!stallAfter.includes(i)) { socket.write(piece); continue }
      // Stalled after the loop's poll (here, in its check phase), the loop reaches its timers
      // before it polls again: the bytes wait in the kernel while the sidecar's timers run.
      await new Promise((resolve) => setImmediate(resolve))
      socket.write(piece)
      stall(options.stallMs ?? 1500)
    }
    if (!socket.destroyed) await new Promise((resolve) => socket.once('close', resolve))
    return { answer, cut: sidecar.sidecar.dataPlane.stats.clientErrors.get('slow_client') ?? 0 }
  }

  t.test('an upload too large to buffer that keeps moving is never cut, however long it takes', async (t) => {
    // 150 KiB, more than is read whole before dispatch: a piece every 100 ms, 3 s in all, three
    // times idleTimeoutMs, never silent for it.
    const piece = 'y'.repeat(5 * 1024)
    const { answer, cut } = await sendPieces(t, Array(30).fill(piece), [])
    t.ok(answer.includes('\r\n\r\n') && answer.length > 30 * piece.length, 'the whole echo came back')
    t.match(answer, /^HTTP\/1\.1 200 /, 'answered 200')
    t.equal(cut, 0, 'nobody was cut')
  })

  t.test('a client that keeps sending is not cut for a stall of the sidecar\'s own event loop', async (t) => {
    t.test('a body streamed to the upstream (the silence sweep)', async (t) => {
      const piece = 'z'.repeat(5 * 1024)
      const { answer, cut } = await sendPieces(t, Array(20).fill(piece), [3, 7])
      t.equal(cut, 0, 'nobody was cut')
      t.match(answer, /^HTTP\/1\.1 200 /, 'answered 200')
      t.ok(answer.length > 20 * piece.length, 'the whole echo came back')
    })
    t.test('a small body read whole before dispatch (its deadline)', async (t) => {
      const { answer, cut } = await sendPieces(t, ['a'.repeat(100), 'b'.repeat(100)], [1])
      t.equal(cut, 0, 'nobody was cut')
      t.match(answer, /^HTTP\/1\.1 200 /, 'answered 200')
      t.match(answer, /"body":"a{100}b{100}"/, 'the upstream got the body whole')
    })
    t.test('a client given the short grace, half of the pool waiting on clients (its socket timer)', async (t) => {
      // Two connections: one upload held open is half of them, so the next is graced, allowed
      // 1 s of silence instead of idleTimeoutMs.
      const graced = await startTestSidecar(t, oneRoute(up.url, { idleTimeoutMs: 30_000 }, { connections: 2 }))
      const app = graced.sidecar.dataPlane.runtime.upstreams.get('app')
      await nonReader(t, graced.proxyPort, `POST /held HTTP/1.1\r\nHost: a\r\nContent-Length: ${1024 * 1024}\r\n\r\n${'h'.repeat(1000)}`)
      t.ok(await eventually(() => app?.held === 1), 'one upload holds a connection')
      // 100 KiB declared, 20 KiB sent, each piece before a stall of 1.5 s, then nothing more.
      const piece = 'g'.repeat(5 * 1024)
      const { answer, cut } = await sendPieces(t, Array(4).fill(piece), [0, 1, 2], { sidecar: graced, stallMs: 1500, length: 100 * 1024 })
      t.equal(answer, '', 'no answer: the body never ended')
      t.equal(cut, 1, 'cut once it went silent for the grace, and only then')
    })
  })

  t.test('counted', async (t) => {
    t.equal(sumOf(await scrape(bw.ops), 'breakwater_client_errors_total', { error: 'slow_client' }), 4, 'breakwater_client_errors_total{error="slow_client"}')
  })
})

t.test('a small upload still arriving holds no bulkhead slot and no half-open probe', async (t) => {
  let failing = false
  const up = await startUpstream((req, res, body) => {
    if (failing) { res.writeHead(500).end('down'); return }
    echo(req, res, body)
  })
  t.teardown(up.close)
  const bw = await startTestSidecar(t, {
    ...oneRoute(up.url, { name: 'r' }),
    circuitBreakers: { app: { maxConcurrentRequests: 1, volumeThreshold: 2, failureThreshold: 0.5, recoveryTimeout: 200 } }
  })

  t.test('the bulkhead', async (t) => {
    // Three uploads of 1,000 bytes trickling 10 bytes every 100 ms: 10 s each to arrive.
    const slow = [await trickler(t, bw.proxyPort, 1000, 100), await trickler(t, bw.proxyPort, 1000, 100), await trickler(t, bw.proxyPort, 1000, 100)]
    const others: number[] = []
    for (let i = 0; i < 5; i++) others.push((await send(bw.proxy, `/other/${i}`, { method: 'POST', body: 'small order' })).status)
    t.same(others, [200, 200, 200, 200, 200], 'with a bulkhead of 1, every other request is answered')
    t.equal(slow.filter((s) => !s.destroyed).length, 3, 'while the three uploads are still arriving')
    t.equal(sumOf(await scrape(bw.ops), 'breakwater_rejections_total', { reason: 'bulkhead' }), 0, 'nothing refused as bulkhead_full')
    t.equal(bw.sidecar.dataPlane.stats.receiving, 3, 'counted as receiving (a shutdown deadline counts them as cut)')
    for (const s of slow) s.destroy()
    t.ok(await eventually(() => bw.sidecar.dataPlane.stats.receiving === 0, 10_000), 'and no longer once they left')
  })

  t.test('a complete small upload goes through whole', async (t) => {
    const socket = net.connect(bw.proxyPort, '127.0.0.1')
    socket.on('error', () => {})
    t.teardown(() => { socket.destroy() })
    await once(socket, 'connect')
    socket.write('POST /whole HTTP/1.1\r\nHost: a\r\nContent-Length: 30\r\nConnection: close\r\n\r\n')
    for (const part of ['0123456789', 'abcdefghij', 'ABCDEFGHIJ']) {
      await new Promise((resolve) => setTimeout(resolve, 50))
      socket.write(part)
    }
    const chunks: Buffer[] = []
    socket.on('data', (c: Buffer) => chunks.push(c))
    await once(socket, 'close')
    const answer = Buffer.concat(chunks).toString()
    t.match(answer, /^HTTP\/1\.1 200/, 'answered 200')
    t.match(answer, /"body":"0123456789abcdefghijABCDEFGHIJ"/, 'the upstream got the body whole')
    t.same(up.received.filter((r) => r.url === '/whole').map((r) => r.bytes), [30], 'once')
  })

  t.test('the half-open probe', async (t) => {
    failing = true
    // Failures until they outweigh the earlier successes in the window and the circuit opens.
    let opened = false
    for (let i = 0; i < 50 && !opened; i++) opened = (await send(bw.proxy, `/fail/${i}`)).headers['x-breakwater-error'] === 'circuit_open'
    t.ok(opened, 'the circuit opened')
    failing = false
    await new Promise((resolve) => setTimeout(resolve, 400)) // past recoveryTimeout (200 ms)
    const slow = await trickler(t, bw.proxyPort, 1000, 100)
    const probe = await send(bw.proxy, '/probe')
    t.equal(probe.status, 200, 'the first whole request is the probe, not the upload still arriving')
    t.equal((await send(bw.proxy, '/after')).status, 200, 'and the circuit closed')
    t.notOk(slow.destroyed, 'while the upload is still arriving')
    slow.destroy()
  })
})

/**
 * One connection, held by /slow until released: the request `options` describe waits in the
 * pool's queue as /queued, its client silent (it has sent all it has, and nothing reads more of
 * it until a connection is free) for longer than idleTimeoutMs. It must be the upstream's 504.
 */
async function queuedPast (t: Test, options: Partial<Dispatcher.RequestOptions>): Promise<void> {
  let release: () => void = () => {}
  const released = new Promise<void>((resolve) => { release = resolve })
  const up = await startUpstream((req, res, body) => {
    if (req.url === '/slow') { void released.then(() => echo(req, res, body)); return }
    echo(req, res, body)
  })
  t.teardown(up.close)
  let connections = 0
  up.server.on('connection', () => { connections++ })
  const { proxy, ops, logs } = await startTestSidecar(t, oneRoute(up.url, { name: 'r', idleTimeoutMs: 300, timeoutMs: 60_000 }, { connections: 1 }))
  const slow = send(proxy, '/slow')
  t.ok(await eventually(() => up.received.length === 1), 'the one connection is busy')
  const queued = await send(proxy, '/queued', options)
  const opened = connections // the busy one, and any the sidecar's own checks opened
  release()
  t.equal((await slow).status, 200)
  t.equal(queued.status, 504, 'answered, not disconnected')
  t.equal(queued.headers['x-breakwater-error'], 'upstream_timeout')
  const samples = await scrape(ops)
  t.equal(sumOf(samples, 'breakwater_client_errors_total', { error: 'slow_client' }), 0, 'no slow client counted')
  t.equal(sumOf(samples, 'breakwater_requests_total', { code: '504', source: 'breakwater' }), 1, 'counted once, as Breakwater\'s 504')
  const line = logs.find((l) => l['url.path'] === '/queued')
  t.equal(line?.outcome, 'upstream', 'the upstream\'s outcome: it had no connection free')
  t.equal(line?.['http.response.status_code'], 504)
  await new Promise((resolve) => setTimeout(resolve, 100))
  t.notOk(up.received.some((r) => r.url === '/queued'), 'the request given up was never sent')
  t.equal((await send(proxy, '/after')).status, 200)
  t.equal(connections, opened, 'the connection the given-up request found free served the next one (no reconnect)')
}

t.test('a request waiting for a free upstream connection is not a slow client: past idleTimeoutMs it is the upstream\'s 504', async (t) => {
  t.test('a GET', async (t) => { await queuedPast(t, {}) })
  t.test('a streamed (chunked) upload', async (t) => {
    await queuedPast(t, { method: 'POST', body: Readable.from([Buffer.from('streamed '), Buffer.from('upload')]) })
  })
})

/**
 * An upstream that accepts /stalled and never reads it (any other request it reads and leaves
 * unanswered): a streamed upload fills its TCP window, and nothing more of the client's body can
 * be read meanwhile. The client keeps sending: the stall must be the upstream's 504. `hold`, given
 * the sidecar, runs before the upload.
 */
async function stalledUpload (t: Test, routeOptions: Record<string, unknown>, upstreamOptions: Record<string, unknown>, hold?: (sidecar: TestSidecar) => Promise<void>): Promise<void> {
  const upstreamSockets = new Set<net.Socket>()
  const up = net.createServer((socket) => {
    upstreamSockets.add(socket)
    socket.on('error', () => {})
    socket.on('close', () => upstreamSockets.delete(socket))
    socket.once('data', (chunk: Buffer) => { if (chunk.includes('/stalled')) socket.pause() })
  })
  up.listen(0, '127.0.0.1')
  await once(up, 'listening')
  t.teardown(() => { for (const s of upstreamSockets) s.destroy(); up.close() })
  const port = (up.address() as net.AddressInfo).port
  const sidecar = await startTestSidecar(t, oneRoute(`http://127.0.0.1:${port}`, { name: 'r', timeoutMs: 60_000, ...routeOptions }, upstreamOptions))
  const { proxyPort, ops, logs } = sidecar
  if (hold !== undefined) await hold(sidecar)

  const length = 64 * 1024 * 1024
  const socket = net.connect(proxyPort, '127.0.0.1')
  t.teardown(() => { socket.destroy() })
  await once(socket, 'connect')
  let answer = ''
  socket.setEncoding('latin1')
  socket.on('data', (chunk: string) => { answer += chunk })
  socket.on('error', () => {})
  socket.write(`PUT /stalled HTTP/1.1\r\nHost: a\r\nContent-Type: application/octet-stream\r\nContent-Length: ${length}\r\n\r\n`)
  const piece = Buffer.alloc(1024 * 1024, 'u')
  for (let i = 0; i < length / piece.length; i++) socket.write(piece) // the whole body, buffered here as needed
  await new Promise((resolve) => socket.once('close', resolve))

  // The rest of the body stays unread when the connection closes: a reset (or, writing, EPIPE)
  // may follow the answer, never come instead of it.
  t.match(answer, /^HTTP\/1\.1 504 /, 'answered 504')
  t.match(answer, /"error":"upstream_timeout"/, 'the answer arrived whole')
  t.match(answer, /\r\nx-breakwater-error: upstream_timeout\r\n/i, 'upstream_timeout')
  t.match(answer, /\r\nconnection: close\r\n/i, 'and the connection closed after it (the rest of the body is not read)')
  const samples = await scrape(ops)
  t.equal(sumOf(samples, 'breakwater_client_errors_total', { error: 'slow_client' }), 0, 'no slow client counted')
  t.ok(await eventually(() => logs.some((l) => l['url.path'] === '/stalled')), 'logged')
  const line = logs.find((l) => l['url.path'] === '/stalled')
  t.equal(line?.outcome, 'upstream', 'the upstream\'s outcome')
  t.equal(line?.['http.response.status_code'], 504)
}

t.test('an upstream that stops reading a streamed upload is the upstream\'s 504, not a slow client', async (t) => {
  await stalledUpload(t, { idleTimeoutMs: 300 }, {})
})

t.test('an upstream that stops reading a streamed upload given the short grace (half of the pool waiting on clients) is the upstream\'s 504, not a slow client', async (t) => {
  // Two connections: an upload kept moving holds one, half of them, so the next is graced, allowed
  // 1 s of silence rather than idleTimeoutMs (3 s) before it is the client's.
  await stalledUpload(t, { idleTimeoutMs: 3000 }, { connections: 2 }, async (sidecar) => {
    const app = sidecar.sidecar.dataPlane.runtime.upstreams.get('app')
    await trickler(t, sidecar.proxyPort, 1024 * 1024, 200)
    t.ok(await eventually(() => app?.held === 1), 'one upload holds a connection')
  })
})
