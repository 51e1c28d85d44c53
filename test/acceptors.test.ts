/**
 * `listen.proxy.acceptors`: several listening sockets share the proxy port (SO_REUSEPORT) where
 * Node and the OS can, so a busy event loop accepts that many new connections per turn. Each
 * socket hands its connections to the one HTTP server: limits, drain and shutdown see them all.
 * Where ports cannot be shared (Node before 22.12), the listener is one socket as before.
 */
import t from 'tap'
import net from 'node:net'
import { readdirSync, readFileSync, readlinkSync } from 'node:fs'
import { startUpstream, echo } from './helpers/upstream.js'
import { startTestSidecar, oneRoute } from './helpers/sidecar.js'
import { raw } from './helpers/http.js'
import { parseResponse } from './helpers/wire.js'
import { REUSE_PORT } from '../src/proxy/server.js'

/**
 * Listening TCP sockets of this process (the sidecar runs in it) on 127.0.0.1:`port`, from the
 * kernel's own table. Only this process's: the other test files run beside this one, and once a
 * socket of another process was counted on the same port.
 */
function listeningSockets (port: number): number {
  const local = `0100007F:${port.toString(16).toUpperCase().padStart(4, '0')}`
  const ours = new Set<string>()
  for (const fd of readdirSync('/proc/self/fd')) {
    let target = ''
    try { target = readlinkSync(`/proc/self/fd/${fd}`) } catch { continue } // closed meanwhile
    const m = /^socket:\[(\d+)\]$/.exec(target)
    if (m !== null) ours.add(m[1] as string)
  }
  // Fields: sl, local address, remote address, state (0A: LISTEN), queues, timers, retransmits, uid, timeout, inode.
  return readFileSync('/proc/net/tcp', 'utf8').split('\n').slice(1)
    .map((line) => line.trim().split(/\s+/))
    .filter((f) => f[1] === local && f[3] === '0A' && ours.has(f[9] as string)).length
}

async function listen (options: net.ListenOptions & { reusePort?: boolean }): Promise<net.Server> {
  const server = net.createServer((s) => s.destroy())
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(options, resolve)
  })
  return server
}

t.test('the proxy port is held by `acceptors` sockets where ports can be shared, one elsewhere', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const { sidecar, proxyPort } = await startTestSidecar(t, {
    ...oneRoute(up.url),
    listen: { proxy: { host: '127.0.0.1', port: 0, acceptors: 4 }, ops: { host: '127.0.0.1', port: 0 }, admin: { host: '127.0.0.1', port: 0 } }
  })
  t.equal(listeningSockets(proxyPort), REUSE_PORT ? 4 : 1, `listening sockets on the proxy port (Node ${process.version})`)

  // 200 connections at once, each a request: every one is answered by the proxy, whichever socket took it.
  const replies = await Promise.all(Array.from({ length: 200 }, async (_, i) =>
    parseResponse(await raw(proxyPort, `GET /c/${i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`, 10_000))))
  t.equal(replies.filter((r) => r.status === 200).length, 200, '200 simultaneous connections, 200 answers')
  t.equal(up.received.length, 200, 'each reached the upstream once')

  await sidecar.close()
  t.equal(listeningSockets(proxyPort), 0, 'after shutdown no socket listens on the port')
})

t.test('acceptors: 1 keeps one socket', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const { proxyPort } = await startTestSidecar(t, {
    ...oneRoute(up.url),
    listen: { proxy: { host: '127.0.0.1', port: 0, acceptors: 1 }, ops: { host: '127.0.0.1', port: 0 }, admin: { host: '127.0.0.1', port: 0 } }
  })
  t.equal(listeningSockets(proxyPort), 1)
  t.equal(parseResponse(await raw(proxyPort, 'GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')).status, 200)
})

t.test('limits.maxConnections counts the connections of every socket', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const { proxyPort } = await startTestSidecar(t, {
    ...oneRoute(up.url),
    listen: { proxy: { host: '127.0.0.1', port: 0, acceptors: 4 }, ops: { host: '127.0.0.1', port: 0 }, admin: { host: '127.0.0.1', port: 0 } },
    limits: { maxConnections: 2 }
  })
  const held: net.Socket[] = []
  t.teardown(() => { for (const s of held) s.destroy() })
  // Twelve connections held open: the kernel spreads them over the sockets; only two are let in.
  const answers = await Promise.all(Array.from({ length: 12 }, async () => await new Promise<string>((resolve) => {
    const s = net.connect(proxyPort, '127.0.0.1')
    held.push(s)
    let got = ''
    s.on('data', (d) => { got += d.toString('latin1') })
    s.on('error', () => {})
    s.on('close', () => { resolve(got) })
    s.write('GET /hold HTTP/1.1\r\nHost: x\r\n\r\n')
    // A kept-alive answer does not close: read what came after a moment.
    setTimeout(() => { resolve(got) }, 1500)
  })))
  const ok = answers.filter((a) => a.startsWith('HTTP/1.1 200')).length
  const overloaded = answers.filter((a) => a.startsWith('HTTP/1.1 503') && a.includes('overloaded')).length
  t.equal(ok, 2, 'two connections served')
  t.equal(overloaded, 10, 'the other ten refused with 503 overloaded, whichever socket accepted them')
})

t.test('a port already held fails the start, even by a socket that shares ports', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  // Another process of this user listening with SO_REUSEPORT (where it exists): sharing would
  // hand it part of the sidecar's traffic, so the sidecar must refuse the port instead.
  const other = await listen({ host: '127.0.0.1', port: 0, reusePort: REUSE_PORT })
  t.teardown(() => { other.close() })
  const port = (other.address() as net.AddressInfo).port
  await t.rejects(startTestSidecar(t, {
    ...oneRoute(up.url),
    listen: { proxy: { host: '127.0.0.1', port, acceptors: 4 }, ops: { host: '127.0.0.1', port: 0 }, admin: { host: '127.0.0.1', port: 0 } }
  }), { code: 'EADDRINUSE' }, 'the start fails on the busy port')
  t.equal(listeningSockets(port), 1, 'the other process still holds the port alone')
})
