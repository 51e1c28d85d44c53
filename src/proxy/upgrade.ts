/**
 * HTTP/1.1 Upgrade: the tunnel mechanics of a WebSocket handshake. The handshake runs the
 * pipeline's stages like any request (pipeline.ts: admission, normalise, match, kill switch,
 * fault, breaker and bulkhead, accounting); a `Tunnel` is its context and its forward stage: it
 * sends the handshake through the endpoint's pool with undici's `upgrade` option, and once the
 * upstream answers 101 it splices the two sockets together both ways.
 *
 * The request is the handshake: it ends (and is counted, logged, and given its cause) at the
 * upstream's answer; the tunnel that follows is a connection, not a request, and holds no
 * bulkhead slot. Other upgrade protocols (h2c) are refused with 400: HTTP/2 is out of scope.
 */
import type { IncomingMessage } from 'node:http'
import type { Duplex } from 'node:stream'
import type { Dispatcher } from 'undici'
import type { DataPlane } from './dataplane.js'
import type { Route } from './route-table.js'
import type { RequestHead } from './headers.js'
import { responseHeaders } from './headers.js'
import { RequestContext, CLIENT_CLOSED } from './context.js'
import { rawErrorResponse, endedAtHead, NO_ENDPOINT, KILLED_MEANWHILE, type ErrorCode } from './errors.js'

function destroy (this: Duplex): void {
  this.destroy()
}

/**
 * RFC 6455 §4.1: a client sends no frames before the server's handshake answer; more than this
 * while waiting for it is not a WebSocket client.
 */
const MAX_EARLY_BYTES = 64 * 1024

export class Tunnel extends RequestContext implements Dispatcher.DispatchHandler {
  // The forward stage runs only on a request the pipeline has normalised and routed.
  declare route: Route
  declare head: RequestHead
  readonly client: Duplex
  /**
   * Bytes the client sent behind its handshake, until the upstream answers. The client socket
   * is read meanwhile (a paused socket would never notice that its client left).
   */
  private readonly early: Buffer[]
  private earlyBytes: number
  private abort: ((err?: Error) => void) | null = null
  private upgraded = false
  private answered = false
  /** A refusal's relay is over: complete, cut, or its client gone. */
  private relayed = false

  constructor (dp: DataPlane, req: IncomingMessage, client: Duplex, early: Buffer) {
    super(dp, req, true)
    this.client = client
    this.early = early.length > 0 ? [early] : []
    this.earlyBytes = early.length
    client.on('error', destroy)
  }

  get clientGone (): boolean {
    return this.client.destroyed
  }

  start (): void {
    this.begin()
    const endpoint = (this.upstream as NonNullable<typeof this.upstream>).balancer.pick()
    if (endpoint === null) { this.failUpstream(NO_ENDPOINT); return }
    this.endpoint = endpoint
    this.attempt = 1
    const client = this.client
    const left = (): void => {
      if (!this.answered) { this.clientLeft(); return }
      // Gone during a refusal's body: the status it got stands, the cause is the client's
      // (context.ts `leftDuringBody`), and the upstream request is given up with its slot.
      if (this.upgraded || this.relayed) return
      this.relayed = true
      this.leftDuringBody()
      this.end()
      this.abort?.()
    }
    client.once('end', left).once('close', left)
    client.on('data', this.onClientData)
    endpoint.pool.dispatch({
      path: this.route.upstreamPath(this.path),
      method: 'GET',
      headers: this.head.headers,
      upgrade: 'websocket',
      headersTimeout: this.route.config.timeoutMs,
      // A refusal's body (a 101 takes the socket away before any body) that stalls holds the
      // handshake's slot and the drain: bounded as any response body is, by `idleTimeoutMs`.
      bodyTimeout: this.route.config.idleTimeoutMs
    }, this)
  }

  override clientLeft (): void {
    super.clientLeft()
    this.client.destroy()
    this.abort?.()
  }

  private readonly onClientData = (chunk: Buffer): void => {
    this.early.push(chunk)
    this.earlyBytes += chunk.length
    if (this.earlyBytes > MAX_EARLY_BYTES) this.client.destroy()
  }

  protected respond (code: ErrorCode, status: number, message: string | undefined, extra: string[] | undefined): void {
    const client = this.client
    if (client.writable) client.end(rawErrorResponse(code, this.requestId, extra, message, status))
    else client.destroy()
  }

  onConnect (abort: (err?: Error) => void): void {
    if (this.client.destroyed) { abort(); return }
    if (this.killedMeanwhile()) { abort(KILLED_MEANWHILE); return }
    this.abort = abort
  }

  onUpgrade (statusCode: number, rawHeaders: Buffer[] | string[] | null, upstream: Duplex): void {
    this.upgraded = true
    this.answered = true
    const client = this.client
    if (client.destroyed) {
      upstream.destroy()
      this.conclude(CLIENT_CLOSED, null)
      this.end()
      return
    }
    let response = `HTTP/1.1 ${statusCode} Switching Protocols\r\n`
    const raw = rawHeaders ?? []
    for (let i = 0; i < raw.length; i += 2) response += `${raw[i]?.toString()}: ${raw[i + 1]?.toString()}\r\n`
    client.write(response + '\r\n')
    client.removeListener('data', this.onClientData)
    for (const chunk of this.early) upstream.write(chunk)
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
    this.source = 'upstream'
    this.conclude(statusCode, null)
    this.end()
  }

  // The upstream refused the upgrade with an ordinary response: relay it, close-delimited.
  onHeaders (statusCode: number, rawHeaders: Buffer[], _resume: () => void, statusText: string): boolean {
    // RFC 9110 §15.2: an interim response (103 Early Hints) is neither the 101 nor a refusal;
    // the upstream's answer follows it. Not relayed, as the forward stage does.
    if (statusCode < 200) return true
    this.answered = true
    let response = `HTTP/1.1 ${statusCode} ${statusText}\r\n`
    // Hop-by-hop headers go as from any response (RFC 9110 §7.6.1); the length too, since the
    // refusal is relayed close-delimited.
    const headers = responseHeaders(rawHeaders, false)
    for (let i = 0; i < headers.length; i += 2) {
      const name = headers[i] as string
      if (name.length === 14 && name.toLowerCase() === 'content-length') continue
      response += `${name}: ${headers[i + 1] as string}\r\n`
    }
    this.client.write(response + 'connection: close\r\n\r\n')
    this.source = 'upstream'
    // Its body may still be cut: judged when it ends, as a proxied response is.
    this.conclude(statusCode, null, true)
    return true
  }

  onData (chunk: Buffer): boolean {
    this.client.write(chunk)
    return true
  }

  onComplete (): void {
    this.relayed = true
    this.client.end()
    this.end()
  }

  onError (err: Error): void {
    if (this.upgraded || this.relayed) return
    if (this.answered) {
      // A 204 or 304 refusal that announced a length: complete at its head, as on any response.
      if (endedAtHead(this.status, err)) { this.onComplete(); return }
      // The upstream cut its refusal short, or let its body stall for `idleTimeoutMs`; or the
      // shutdown deadline closed the pools under it (ours, as on the forward path).
      this.relayed = true
      this.conclude(this.status, this.dp.cutting ? 'shutdown_deadline' : (err as { code?: string }).code === 'UND_ERR_BODY_TIMEOUT' ? 'upstream_timeout' : 'upstream_reset')
      this.client.destroy()
      this.end()
      return
    }
    if (this.clientGone) { this.clientLeft(); return }
    this.failUpstream(err)
  }
}
