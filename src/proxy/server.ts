/**
 * The proxy listener: a `node:http` server (`node:https` when `tls` is configured, SPEC §18)
 * whose request listener is the pipeline.
 * (Measured against a fastify catch-all route, see bench/README.md: the raw listener leaves
 * more of the per-request budget to the stages.) This file owns what happens before a request
 * exists — parser errors, header limits, connection caps — and the listener's timeouts.
 */
import http from 'node:http'
import https from 'node:https'
import net, { type AddressInfo, type Socket } from 'node:net'
import type { Duplex } from 'node:stream'
import type { Listener, ProxyListenerConfig } from '../config/types.js'
import type { DataPlane } from './dataplane.js'
import type { Tracing } from './trace.js'
import { createPipeline, createBarePipeline, handleUpgrade, unmetExpectation, awaitingContinue, type PipelineOptions } from './pipeline.js'
import { rawErrorResponse, type ClientErrorCode } from './errors.js'
import { readingBody } from './forward.js'
import { CertificateWatcher, listenerTlsOptions, type ListenerTlsStats } from './tls.js'

export interface ProxyServer {
  server: http.Server
  /** Further listening sockets on the same port (`acceptors`), handing their connections to `server`. */
  readonly acceptors: net.Server[]
  /** Open client connections. */
  readonly connections: Set<Socket>
  /** A TLS listener's certificate watcher (started and stopped by the sidecar); null for plain HTTP. */
  readonly certificates: CertificateWatcher | null
  readonly tlsStats: ListenerTlsStats | null
}

/** `role`: which routes this listener reaches (`routes[].listener`). */
export function createProxyServer (dp: DataPlane, listener: ProxyListenerConfig, role: Listener, maxConnections: () => number, tracing: Tracing, bare = false): ProxyServer {
  const headersTimeout = listener.requestTimeoutMs > 0 ? Math.min(listener.headersTimeoutMs, listener.requestTimeoutMs) : listener.headersTimeoutMs
  const serverOptions: http.ServerOptions = {
    maxHeaderSize: listener.maxHeaderSize,
    // Node's default 300 s whole-request timeout would cut long uploads; off unless configured (SPEC §14).
    requestTimeout: listener.requestTimeoutMs,
    headersTimeout,
    // Node checks both timeouts only every connectionsCheckingInterval (default 30 s), so a
    // 10 s headersTimeoutMs answered its 408 after up to 40 s. Checked every tenth of the
    // shorter one (10 ms to 1 s), as the silence sweep does for idleTimeoutMs.
    connectionsCheckingInterval: checkingIntervalMs(headersTimeout, listener.requestTimeoutMs),
    keepAliveTimeout: listener.keepAliveTimeoutMs,
    noDelay: true,
    // RFC 9112 §6.1: a request with both Content-Length and Transfer-Encoding is a smuggling
    // attempt; Node's strict parser (the default, never the lenient one) refuses it.
    insecureHTTPParser: false,
    // RFC 9112 §3.2: an HTTP/1.1 request without Host is refused, by the pipeline (a JSON 400
    // with `x-breakwater-error`, counted and logged) rather than by Node's bare 400.
    requireHostHeader: bare
  }
  const onRequest = (req: http.IncomingMessage, res: http.ServerResponse): void => {
    if (refusedOpen > 0 && refused.has(req.socket)) {
      // A TLS socket's 503 may still be on its way through the session: it closes once sent.
      if (tls === null) res.destroy()
      return
    }
    pipeline(req, res)
  }
  const tls = listener.tls
  // A client gets no longer for its handshake than for its request head (Node's default is 120 s).
  const secure = tls === null ? null : https.createServer({ ...serverOptions, ...listenerTlsOptions(tls, `listen.${role}.tls`), handshakeTimeout: headersTimeout }, onRequest)
  const server: http.Server = secure ?? http.createServer(serverOptions, onRequest)
  // Node keeps the first maxHeadersCount fields and drops the rest without a word (its default,
  // 2000, forwarded 2,100 headers truncated, Authorization gone). One more than the limit is
  // enough to see it was exceeded, and that request is refused whole: 431, nothing forwarded.
  server.maxHeadersCount = listener.maxHeadersCount + 1
  const options: PipelineOptions = { proto: tls === null ? 'http' : 'https', listener: role, maxHeaderFields: listener.maxHeadersCount * 2, tracing }
  const pipeline = (bare ? createBarePipeline : createPipeline)(dp, options)
  server.keepAliveTimeout = listener.keepAliveTimeoutMs

  const connections = new Set<Socket>()
  // Connections over limits.maxConnections get a 503 and nothing of theirs is parsed on:
  // Node attaches its HTTP parser to every connection, so their requests are dropped at the door.
  const refused = new WeakSet<Socket>()
  let refusedOpen = 0
  // A TLS listener counts and answers connections once their handshake is done: the refusal
  // must be written inside the TLS session, and the HTTP layer serves the TLS socket.
  server.prependListener(tls === null ? 'connection' : 'secureConnection', (socket: Socket) => {
    const max = maxConnections()
    if (max > 0 && connections.size >= max) {
      dp.stats.overloaded.max_connections++
      refused.add(socket)
      refusedOpen++
      socket.once('close', () => { refusedOpen-- })
      socket.on('error', () => socket.destroy())
      // Every local answer names a request id (SPEC §3), even one given before any request is read.
      const refusal = rawErrorResponse('overloaded', dp.newRequestId())
      if (tls === null) socket.end(refusal)
      else socket.end(refusal, () => socket.destroy())
      return
    }
    connections.add(socket)
    socket.once('close', () => connections.delete(socket))
  })

  server.on('clientError', (err: NodeJS.ErrnoException, socket: Duplex) => {
    // RFC 9112 §9.6: bytes after a request with `Connection: close` are not a request. The one
    // before is still being answered and Node closes the connection after its response: ignore
    // them (answering 400 here would replace the upstream's real answer).
    if (err.code === 'HPE_CLOSED_CONNECTION') return
    const code: ClientErrorCode = err.code === 'HPE_HEADER_OVERFLOW'
      ? 'headers_too_large'
      : err.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 'request_timeout' : 'bad_request'
    const inFlight = (socket as Duplex & { _httpMessage?: http.ServerResponse })._httpMessage
    // HPE_INVALID_EOF_STATE: the client ended the connection in the middle of a request (a
    // half-sent head or body). It left; that is not a malformed request (a request in flight is
    // accounted as the client's departure, 499), and nobody waits for a 400.
    if (err.code === 'ECONNRESET' || err.code === 'HPE_INVALID_EOF_STATE' || !socket.writable || inFlight?.headersSent === true) {
      socket.destroy()
      return
    }
    if (dp.logger.isLevelEnabled('debug')) dp.logger.debug({ event: 'client_error', code, parserError: err.code }, 'request refused by the HTTP parser')
    // Mid-body (a broken chunk): the 400 is the answer to the request in flight, accounted as such.
    const reading = inFlight === undefined || code !== 'bad_request' ? null : readingBody(inFlight)
    if (reading !== null) { reading.refuseBody(`invalid request body framing (${err.code ?? 'parse error'})`); return }
    dp.stats.clientError(code)
    socket.end(rawErrorResponse(code, dp.newRequestId()))
  })

  // A reverse proxy opens no tunnels. Without a 'connect' listener Node would drop the
  // connection without a word; answer like Envoy does for a CONNECT no route takes (404), then close.
  server.on('connect', (_req: http.IncomingMessage, socket: Duplex) => {
    dp.stats.clientError('connect_not_supported')
    if (dp.logger.isLevelEnabled('debug')) dp.logger.debug({ event: 'client_error', code: 'connect_not_supported' }, 'CONNECT refused')
    socket.on('error', () => socket.destroy())
    socket.end(rawErrorResponse('connect_not_supported', dp.newRequestId()))
  })

  server.on('upgrade', (req: http.IncomingMessage, socket: Duplex, head: Buffer) => handleUpgrade(dp, req, socket, head, options))
  // An `Expect` other than 100-continue: Node would answer a bare 417; the pipeline refuses it
  // like any request that cannot be forwarded as sent (undici sends no `Expect`).
  if (!bare) {
    server.on('checkExpectation', (req: http.IncomingMessage, res: http.ServerResponse) => {
      unmetExpectation.add(req)
      onRequest(req, res)
    })
    // `100 Continue` is the pipeline's to send, once the request will be forwarded.
    server.on('checkContinue', (req: http.IncomingMessage, res: http.ServerResponse) => {
      awaitingContinue.add(req)
      onRequest(req, res)
    })
  }
  if (secure === null || tls === null) return { server, acceptors: [], connections, certificates: null, tlsStats: null }

  const tlsStats: ListenerTlsStats = { listener: role, reloads: { ok: 0, failed: 0 }, handshakeFailures: 0 }
  // A failed handshake (no client certificate under mutual TLS, an untrusted one, plain HTTP
  // on the TLS port) has no HTTP response to give: counted, logged at debug, socket closed.
  server.on('tlsClientError', (err: NodeJS.ErrnoException, socket: Duplex) => {
    if (portCheck(err, socket)) {
      if (dp.logger.isLevelEnabled('debug')) dp.logger.debug({ event: 'tls_port_check', listener: role }, 'a connection closed before sending anything (a TCP port check): not a failed handshake')
    } else {
      tlsStats.handshakeFailures++
      if (dp.logger.isLevelEnabled('debug')) dp.logger.debug({ event: 'tls_handshake_failed', listener: role, code: err.code, reason: err.message }, 'TLS handshake failed')
    }
    socket.destroy()
  })
  const certificates = new CertificateWatcher(secure, tls, tlsStats, dp.logger)
  return { server, acceptors: [], connections, certificates, tlsStats }
}

/**
 * A connection its client closed before sending a byte: a load balancer's or kubelet's TCP port
 * check, which never meant to shake hands. The TCP socket under the TLS one (`_parent`, as Node
 * has long named it) tells; without it, the failure is counted as before.
 */
function portCheck (err: NodeJS.ErrnoException, socket: Duplex): boolean {
  return err.code === 'ECONNRESET' && (socket as { _parent?: { bytesRead?: number } })._parent?.bytesRead === 0
}

/**
 * Whether listening sockets can share a port here: `reusePort` (SO_REUSEPORT) came in Node 22.12
 * and 23.1, and Linux spreads new connections over the sockets that share a port.
 */
export const REUSE_PORT = process.platform === 'linux' && reusePortIn(process.versions.node)

function reusePortIn (version: string): boolean {
  const [major = 0, minor = 0] = version.split('.').map(Number)
  return major > 23 || (major === 23 && minor >= 1) || (major === 22 && minor >= 12)
}

/**
 * How often Node checks a listener's head and whole-request timeouts: a tenth of the shorter
 * one that is on (0 is off), 10 ms to 1 s, so a 408 comes at most a tenth late (1 s with the
 * 60 s default).
 */
function checkingIntervalMs (headersTimeoutMs: number, requestTimeoutMs: number): number {
  const limits = [headersTimeoutMs, requestTimeoutMs].filter((ms) => ms > 0)
  if (limits.length === 0) return 1000
  return Math.min(1000, Math.max(10, Math.floor(Math.min(...limits) / 10)))
}

/**
 * Bind a proxy listener; its URL. Node's libuv accepts one connection per event-loop turn and
 * listening socket, so when many clients connect at once (a load balancer's pool opening, a
 * deploy) the last ones wait for hundreds of turns of a busy loop: at c=200 the first second
 * of a run held every response over 1 s (bench/README.md, c200). With `acceptors` sockets on
 * the port, each turn accepts that many; every connection is still served by `server`.
 *
 * SO_REUSEPORT would also let any other process of this user that sets it share the port and
 * take a part of its connections. So the port is first bound once without it: a port already
 * held, by a second Breakwater too, fails here exactly as it does with one socket.
 */
export async function listenProxy (proxy: ProxyServer, host: string, port: number, acceptors: number): Promise<string> {
  const { server, certificates } = proxy
  const shared = REUSE_PORT && acceptors > 1
  if (shared) await bindShared(server, host, port)
  else await bind(server, { host, port })
  const a = server.address() as AddressInfo
  if (shared) {
    // Their sockets are made as `server` makes its own (half-open, no delay, buffer size), then
    // handed to it: one HTTP (or TLS) server, one set of connections, limits and timeouts.
    const { allowHalfOpen, noDelay, keepAlive, keepAliveInitialDelay, highWaterMark } = server as unknown as SocketOptions
    const options = { allowHalfOpen, noDelay, keepAlive, keepAliveInitialDelay, highWaterMark }
    const handOver = (socket: Socket): void => { server.emit('connection', socket) }
    for (let i = 1; i < acceptors; i++) proxy.acceptors.push(await bind(net.createServer(options, handOver), { host, port: a.port, reusePort: true }))
  }
  certificates?.start()
  return boundUrl(server, certificates === null ? 'http' : 'https')
}

/** The URL of the address `server` is bound to (a wildcard address as it is). */
export function boundUrl (server: net.Server, scheme: 'http' | 'https' = 'http'): string {
  const a = server.address() as AddressInfo
  return `${scheme}://${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}`
}

/**
 * Bind `server` with SO_REUSEPORT after a probe bind without it on the same port (port 0 too:
 * the kernel may hand a port-0 bind that shares ports a port others already share). Another
 * bind may take a probed port 0 before ours: probed again, up to 3 times.
 */
async function bindShared (server: net.Server, host: string, port: number): Promise<void> {
  for (let tries = 1; ; tries++) {
    const probed = await close(await bind(net.createServer(), { host, port }))
    try {
      await bind(server, { host, port: probed, reusePort: true })
      return
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EADDRINUSE' || port !== 0 || tries === 3) throw err
    }
  }
}

/** Stop taking new connections on every socket of the listener; open ones carry on. */
export function stopAccepting (proxy: ProxyServer): void {
  // Not `server.close()`: Node's also destroys every idle keep-alive connection at once,
  // racing the requests clients are writing on them (46 resets under 50 busy connections).
  net.Server.prototype.close.call(proxy.server)
  for (const acceptor of proxy.acceptors) acceptor.close()
}

/** What a `net.Server` keeps of its options and gives each socket it accepts. */
interface SocketOptions { allowHalfOpen: boolean, noDelay: boolean, keepAlive: boolean, keepAliveInitialDelay: number, highWaterMark: number }

/** `reusePort` is in Node 22.12's types; this package's are Node 20's (engines' floor). */
type ListenOptions = net.ListenOptions & { reusePort?: boolean }

async function bind<S extends net.Server> (server: S, options: ListenOptions): Promise<S> {
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(options, () => { server.off('error', reject); resolve() })
  })
  return server
}

/** Close `server`; the port it was bound to. */
async function close (server: net.Server): Promise<number> {
  const { port } = server.address() as AddressInfo
  await new Promise<void>((resolve) => { server.close(() => { resolve() }) })
  return port
}
