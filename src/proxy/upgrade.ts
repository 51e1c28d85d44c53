/**
 * HTTP/1.1 Upgrade: a WebSocket handshake is routed like any request (so kill switches and
 * routes apply), sent upstream through the endpoint's pool with undici's `upgrade` option, and
 * once the upstream answers 101 the two sockets are spliced together both ways. Other
 * upgrade protocols (h2c) are refused with 400: HTTP/2 is out of scope.
 */
import type { IncomingMessage } from 'node:http'
import type { Duplex } from 'node:stream'
import type { Dispatcher } from 'undici'
import type { Listener } from '../config/types.js'
import type { DataPlane } from './dataplane.js'
import type { Route } from './route-table.js'
import type { Endpoint } from './balancer.js'
import { normalisePath } from './path.js'
import { requestHead } from './headers.js'
import { killSwitchAllows } from './kill-switch.js'
import { rawErrorResponse, fromUpstreamError, type ErrorCode, ERRORS } from './errors.js'

export function handleUpgrade (dp: DataPlane, req: IncomingMessage, socket: Duplex, head: Buffer, listener: Listener): void {
  const startedAt = performance.now()
  socket.on('error', () => socket.destroy())
  const path = normalisePath(req.url as string)
  const reqHead = requestHead(req.rawHeaders, req.socket.remoteAddress ?? '', 'http', dp.newRequestId)
  if (path === null || !reqHead.isWebSocket || req.method !== 'GET') {
    refuseRaw(dp, socket, 'bad_request', null, reqHead.requestId, startedAt)
    return
  }
  const route = dp.runtime.routes.match('GET', path, reqHead, req, listener)
  if (route === null) {
    refuseRaw(dp, socket, 'no_route', null, reqHead.requestId, startedAt)
    return
  }
  // The same stages as any request: a killed feature or an open circuit refuses the handshake.
  if (!killSwitchAllows(dp.flags, route, 'GET', path, reqHead)) {
    route.stats.reject('kill_switch')
    refuseRaw(dp, socket, 'feature_disabled', route, reqHead.requestId, startedAt)
    return
  }
  const circuit = route.upstream.circuit
  if (circuit !== null && !circuit.admits()) {
    route.stats.reject('circuit_open')
    refuseRaw(dp, socket, 'circuit_open', route, reqHead.requestId, startedAt, ['retry-after', String(circuit.retryAfterSeconds(Date.now()))])
    return
  }
  const endpoint = route.upstream.balancer.pick()
  if (endpoint === null) {
    refuseRaw(dp, socket, 'upstream_unavailable', route, reqHead.requestId, startedAt)
    return
  }
  new Tunnel(dp, route, endpoint, socket, head, reqHead.requestId, startedAt).open(path, reqHead.headers)
}

function refuseRaw (dp: DataPlane, socket: Duplex, code: ErrorCode, route: Route | null, requestId: string, startedAt: number, extra?: string[]): void {
  if (socket.writable) socket.end(rawErrorResponse(code, requestId, extra))
  else socket.destroy()
  const stats = route === null ? dp.stats.route('', '') : route.stats
  stats.record(ERRORS[code].status, (performance.now() - startedAt) / 1000)
}

class Tunnel implements Dispatcher.DispatchHandler {
  private abort: ((err?: Error) => void) | null = null
  private upgraded = false
  private answered = false

  constructor (
    private readonly dp: DataPlane,
    private readonly route: Route,
    private readonly endpoint: Endpoint,
    private readonly client: Duplex,
    private readonly head: Buffer,
    private readonly requestId: string,
    private readonly startedAt: number
  ) {}

  open (path: string, headers: string[]): void {
    this.client.once('close', () => { if (!this.upgraded) this.abort?.() })
    this.endpoint.pool.dispatch({
      path: this.route.upstreamPath(path),
      method: 'GET',
      headers,
      upgrade: 'websocket',
      headersTimeout: this.route.config.timeoutMs
    }, this)
  }

  onConnect (abort: (err?: Error) => void): void {
    if (this.client.destroyed) { abort(); return }
    this.abort = abort
  }

  onUpgrade (statusCode: number, rawHeaders: Buffer[] | string[] | null, upstream: Duplex): void {
    this.upgraded = true
    this.answered = true
    const client = this.client
    if (client.destroyed) { upstream.destroy(); return }
    let response = `HTTP/1.1 ${statusCode} Switching Protocols\r\n`
    const raw = rawHeaders ?? []
    for (let i = 0; i < raw.length; i += 2) response += `${raw[i]?.toString()}: ${raw[i + 1]?.toString()}\r\n`
    client.write(response + '\r\n')
    if (this.head.length > 0) upstream.write(this.head)
    this.dp.tunnels.add(client)
    const end = (): void => {
      this.dp.tunnels.delete(client)
      client.destroy()
      upstream.destroy()
    }
    upstream.on('error', end).on('close', end)
    client.on('error', end).on('close', end)
    upstream.pipe(client)
    client.pipe(upstream)
    this.route.stats.record(statusCode, (performance.now() - this.startedAt) / 1000)
    this.log(statusCode, null)
  }

  // The upstream refused the upgrade with an ordinary response: relay it, close-delimited.
  onHeaders (statusCode: number, rawHeaders: Buffer[], _resume: () => void, statusText: string): boolean {
    this.answered = true
    let response = `HTTP/1.1 ${statusCode} ${statusText}\r\n`
    for (let i = 0; i < rawHeaders.length; i += 2) {
      const name = (rawHeaders[i] as Buffer).toString('latin1')
      const lower = name.toLowerCase()
      if (lower === 'content-length' || lower === 'transfer-encoding' || lower === 'connection' || lower === 'keep-alive') continue
      response += `${name}: ${(rawHeaders[i + 1] as Buffer).toString('latin1')}\r\n`
    }
    this.client.write(response + 'connection: close\r\n\r\n')
    this.route.stats.record(statusCode, (performance.now() - this.startedAt) / 1000)
    this.log(statusCode, null)
    return true
  }

  onData (chunk: Buffer): boolean {
    this.client.write(chunk)
    return true
  }

  onComplete (): void {
    this.client.end()
  }

  onError (err: Error): void {
    if (this.upgraded) return
    if (this.answered) { this.client.destroy(); return }
    const code = fromUpstreamError(err)
    refuseRaw(this.dp, this.client, code, this.route, this.requestId, this.startedAt)
    this.log(ERRORS[code].status, code)
  }

  private log (status: number, error: string | null): void {
    if (this.dp.accessLogRate <= 0) return
    this.dp.logger.info({
      requestId: this.requestId,
      method: 'GET',
      route: this.route.name,
      upstream: this.route.upstream.name,
      endpoint: this.endpoint.origin,
      status,
      upgrade: 'websocket',
      durationMs: Math.round((performance.now() - this.startedAt) * 1e3) / 1e3,
      error: error ?? undefined
    }, 'request')
  }
}
