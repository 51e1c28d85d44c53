/**
 * Stage: forward. One `Exchange` per request is the undici dispatch handler (no per-request
 * closures or promises): the request body streams from the client socket to the upstream,
 * the response streams back with backpressure both ways, and memory stays bounded for any
 * body size.
 *
 * Failure semantics (SPEC §3):
 * - before response headers: a local JSON error (502 `upstream_unavailable`, 504
 *   `upstream_timeout`), unless an idempotent, bodiless request may be retried;
 * - after response headers: the client connection is destroyed — never a truncated body that
 *   looks complete;
 * - the client going away aborts the upstream request.
 *
 * An `Exchange` is the request's context (context.ts) from admission on; the pipeline fills in
 * its head and route, and its endings go through the context's one outcome model.
 */
import type { IncomingMessage, ServerResponse } from 'node:http'
import type { Socket } from 'node:net'
import type { Dispatcher } from 'undici'
import type { DataPlane } from './dataplane.js'
import { requestHostKey, type Route } from './route-table.js'
import type { Upstream } from './upstreams.js'
import type { Fallback, Capture } from './fallback.js'
import type { Endpoint } from './balancer.js'
import type { RequestHead } from './headers.js'
import { responseHeaders, rawHeaderValue } from './headers.js'
import { isConnectFailure, endedAtHead, sendError, NO_ENDPOINT, INVALID_RESPONSE, TRANSFER_CODING, HEAD_TIMEOUT, KILLED_MEANWHILE, BODY_TIMEOUT, QUEUE_TIMEOUT, UPLOAD_STALLED, GIVEN_UP, type ErrorCode } from './errors.js'
import { RequestContext, CLIENT_CLOSED } from './context.js'
import { freshConnection, reusable } from './upstreams.js'
import type { Silent } from './silence.js'

const kExchange = Symbol('breakwater.exchange')
type Tagged = ServerResponse & { [kExchange]?: Exchange }
type TaggedRequest = IncomingMessage & { [kExchange]?: Exchange }

/*
 * Slow clients (SPEC §14; each endpoint's pool has `upstreams.X.connections`, 128 by default).
 * A client that trickles its upload or stops reading must not hold upstream connections that
 * everyone else needs:
 * - every exchange bounds client silence either way with the route's `idleTimeoutMs`;
 * - bodies up to REQUEST_BUFFER_BYTES are read whole before dispatch (HAProxy's
 *   `option http-buffer-request`): a trickled small upload holds no upstream connection,
 *   and must arrive whole within `idleTimeoutMs` (as HAProxy's `timeout http-request`
 *   bounds it), since a trickle is never silent long enough for an idle timer;
 * - up to RESPONSE_READ_AHEAD_BYTES of a response are held for a client that reads slowly,
 *   so a modest response completes upstream and frees its connection whatever the client does;
 * - what still waits on a client (an upload too large to buffer, or a larger response whose
 *   client does not keep up) holds an upstream connection meanwhile. Once half of the
 *   upstream's connections are held so (`Upstream.maxHeld`), a further waiting client gets
 *   STALL_GRACE_MS of silence instead of `idleTimeoutMs` before it is disconnected: a client
 *   that makes progress is never cut, one that stalls cannot take the other half, which
 *   always serves everyone else.
 */
/** Request bodies up to this size are read whole before dispatch. */
const REQUEST_BUFFER_BYTES = 64 * 1024
/** Response bytes held for a client that does not keep up, beyond which the upstream is paused. */
const RESPONSE_READ_AHEAD_BYTES = 64 * 1024
/** Silence allowed to a client waited on while half of the upstream's connections wait on clients. */
const STALL_GRACE_MS = 1000

/** True when the request's body is read whole before dispatch (and can be sent again). */
function buffersBody (head: RequestHead): boolean {
  return head.bodyLength > 0 && head.bodyLength <= REQUEST_BUFFER_BYTES
}

/** RFC 9110 §9.2.2: methods whose repetition has the same effect. */
const IDEMPOTENT = new Set(['GET', 'HEAD', 'OPTIONS', 'TRACE', 'PUT', 'DELETE'])

const WAITING = 0 // dispatched, no response headers yet
const STREAMING = 1 // response headers sent to the client
const DISCARDING = 2 // reading a retriable 503's body before trying again
const DONE = 3

function noop (): void {}

function onResponseClose (this: Tagged): void {
  const ex = this[kExchange]
  if (ex === undefined) return
  ex.release()
  ex.clearBodyDeadline()
  if (ex.state !== DONE) ex.clientLeft()
}

/** The client socket of a graced exchange (see `hold`) was silent both ways for STALL_GRACE_MS. */
function onResponseTimeout (this: Tagged): void {
  const ex = this[kExchange]
  if (ex === undefined || ex.state === DONE) { this.destroy(); return }
  // Sent and waiting for the upstream: the client is not stalling anything (`timeoutMs` bounds
  // that wait). The socket's next byte re-arms the timer.
  if (ex.requestSent && ex.state !== STREAMING) return
  // Bytes that came while the event loop was busy (a stall of the sidecar's own) are read, and
  // a response the client took is acknowledged, at its next poll, after this timer: look once
  // more after that poll before blaming the client.
  setImmediate(onGraceLapsedPolled, ex, progressOf(ex.clientSocket))
}

function onGraceLapsedPolled (ex: Exchange, progress: number): void {
  if (ex.state === DONE || ex.res.destroyed || (ex.requestSent && ex.state !== STREAMING)) return
  // It moved: the socket's timer runs again from that byte.
  if (progressOf(ex.clientSocket) !== progress) return
  // Silent because the upstream takes no more of its upload: not the client's stall, and the
  // upstream's own is judged at `idleTimeoutMs` (`onSilent`).
  if (ex.uploadPaused()) return
  ex.cutSlowClient()
}

/** Bytes read from a client socket and bytes it has taken (written out of the socket's buffer). */
function progressOf (socket: Socket): number {
  return socket.bytesRead + socket.bytesWritten - socket.writableLength
}

function onBodyData (this: TaggedRequest, chunk: Buffer): void {
  this[kExchange]?.bodyChunk(chunk)
}

function onBodyEnd (this: TaggedRequest): void {
  const ex = this[kExchange]
  if (ex !== undefined && ex.state !== DONE) ex.bodyRead()
}

function onBodyDeadline (ex: Exchange): void {
  if (ex.state === DONE) { ex.bodyDeadline = null; return }
  // Bytes that came while the event loop was busy (a stall of the sidecar's own: a long
  // collection, a throttled CPU) are read at its next poll, after this timer: look once more
  // after that poll before blaming the client.
  ex.bodyDeadline = setTimeout(onBodyDeadlinePolled, 1, ex).unref()
}

function onBodyDeadlinePolled (ex: Exchange): void {
  ex.bodyDeadline = null
  if (ex.state !== DONE) ex.cutSlowClient()
}

function onResponseDrain (this: Tagged): void {
  const ex = this[kExchange]
  if (ex === undefined) return
  ex.release()
  const resume = ex.resumeUpstream
  if (resume != null) resume()
}

export class Exchange extends RequestContext implements Dispatcher.DispatchHandler, Silent {
  state = WAITING
  // The forward stage runs only on a request the pipeline has normalised and routed.
  declare route: Route
  declare upstream: Upstream
  declare head: RequestHead
  /** The response body being teed into the route's fallback cache (fallback.ts). */
  private capture: Capture | null = null
  readonly res: Tagged
  abortUpstream: ((err?: Error) => void) | null = null
  resumeUpstream: (() => void) | null = null
  /** The request body, when it is read whole before dispatch (`buffersBody`). */
  body: Buffer | null = null
  /** Until the buffered body has arrived: the time it has to. */
  bodyDeadline: NodeJS.Timeout | null = null
  /** The stage that goes on once the buffered body has arrived. */
  private afterBody: ((ex: Exchange) => void) | null = null
  private bodyFilled = 0
  /** Counted in `upstream.held`: waiting on the client while holding an upstream connection. */
  private holding = false
  /** Given STALL_GRACE_MS rather than `idleTimeoutMs` while holding. */
  private graced = false
  /** undici wrote the whole request of this attempt. */
  requestSent = false
  /** The first byte of this attempt's response arrived: the upstream has begun to answer. */
  private responseStarted = false
  private drainListening = false
  private timeoutListening = false
  /** The sweep's notes (silence.ts). */
  headDueAt = 0
  seenRead = -1
  seenWritten = -1
  quietSince = 0
  silencePrev: Silent | null = null
  silenceNext: Silent | null = null

  constructor (dp: DataPlane, req: IncomingMessage, res: ServerResponse) {
    super(dp, req, false)
    this.res = res as Tagged
  }

  get clientGone (): boolean {
    return this.res.destroyed
  }

  /**
   * Read a small body whole before the upstream is chosen (the pipeline's body stage), then
   * hand the exchange to `next`: a client that trickles it holds no bulkhead slot, no half-open
   * probe and no upstream connection meanwhile. False when there is nothing to read first.
   */
  readBodyFirst (next: (ex: Exchange) => void): boolean {
    if (this.body !== null || !buffersBody(this.head)) return false
    this.watchClient()
    this.body = Buffer.allocUnsafe(this.head.bodyLength)
    this.afterBody = next
    this.dp.stats.receiving++
    const req = this.req as TaggedRequest
    req[kExchange] = this
    req.on('data', onBodyData)
    req.on('end', onBodyEnd)
    this.bodyDeadline = setTimeout(onBodyDeadline, this.route.config.idleTimeoutMs, this).unref()
    return true
  }

  /** Start the exchange: pick an endpoint and dispatch. */
  start (): void {
    this.begin()
    this.watchClient()
    if (this.route.retryBudget !== null) this.route.retryBudget.request(performance.now())
    this.dispatch(null, false)
  }

  /** Follow the client from the first stage that waits on it: its close, its silence. */
  private watchClient (): void {
    const res = this.res
    if (res[kExchange] === this) return
    res[kExchange] = this
    res.on('close', onResponseClose)
    // An aborted upload emits 'error' on the request; undici reports it to us through onError.
    if (this.head.hasBody) this.req.on('error', noop)
    // SPEC §14: `idleTimeoutMs` bounds a stalled body either way (`onSilent`).
    this.dp.silence.watch(this)
  }

  get silenceLimitMs (): number {
    return this.route.config.idleTimeoutMs
  }

  get headLimitMs (): number {
    return this.route.config.timeoutMs
  }

  /** No response head within the route's `timeoutMs` of the request fully sent (silence.ts). */
  onHeadOverdue (): boolean {
    this.headDueAt = 0
    if (this.state !== WAITING || !this.requestSent) return true
    // undici tells its handler (onError) at once, and ends the request's connection.
    const abort = this.abortUpstream
    if (abort !== null) abort(HEAD_TIMEOUT)
    else this.failUpstream(HEAD_TIMEOUT)
    return false
  }

  /** The client moved no byte either way for the route's `idleTimeoutMs` (silence.ts). */
  onSilent (): boolean {
    if (this.state === DONE || this.res.destroyed) return false
    // Sent and waiting for the upstream: the client is not stalling anything. Only response
    // bytes waiting for the client make it the client's silence.
    if (this.requestSent) {
      // Waiting for the head: `timeoutMs` bounds it. Its silence counts again from the next byte.
      if (this.state !== STREAMING) return true
      // Streaming with nothing left to write: every chunk the upstream sent would have moved the
      // client socket's count, so it is the upstream that has sent nothing for `idleTimeoutMs`.
      // undici's bodyTimeout stays behind this, but ticks in half-seconds.
      if (this.res.writableLength === 0) { this.upstreamStalled(); return false }
    } else if (this.started && this.afterBody === null && (this.abortUpstream === null || !(this.head.hasBody && this.body === null))) {
      // Dispatched and waiting in the pool's queue for a connection, every one busy with the
      // upstream (or with nothing left to come from the client): nothing reads the client
      // meanwhile, a streamed upload included, so it stalls nothing (it is not a slow client);
      // the upstream is saturated (HAProxy's `timeout queue`). undici hears of it at
      // `onConnect`, which gives up a request already ended.
      this.failUpstream(QUEUE_TIMEOUT)
      return false
    } else if (this.uploadPaused()) {
      // The client is silent because nothing reads it: the upstream stalled (HAProxy's
      // `timeout server`, Envoy's idle timeout upstream), its 504.
      this.abortUpstream?.(UPLOAD_STALLED)
      return false
    }
    this.cutSlowClient()
    return false
  }

  /**
   * undici paused the streamed upload, not yet all sent: the upstream's socket takes no more of
   * it (its TCP window is full).
   */
  uploadPaused (): boolean {
    return !this.requestSent && this.abortUpstream !== null && this.req.isPaused()
  }

  /** The upstream stopped sending its response body for `idleTimeoutMs` (`onSilent`). */
  private upstreamStalled (): void {
    const abort = this.abortUpstream
    // undici tells its handler (onError: `upstream_timeout`) at once, and ends the connection.
    if (abort !== null) { abort(BODY_TIMEOUT); return }
    this.conclude(this.status, 'upstream_timeout')
    this.res.destroy()
    this.done()
  }

  /** A piece of a body read before dispatch (Node's parser delivers exactly Content-Length bytes). */
  bodyChunk (chunk: Buffer): void {
    chunk.copy(this.body as Buffer, this.bodyFilled)
    this.bodyFilled += chunk.length
  }

  /** The whole body has arrived: on to the next stage. */
  bodyRead (): void {
    this.clearBodyDeadline()
    this.dp.stats.receiving--
    const next = this.afterBody
    this.afterBody = null
    if (next !== null) next(this)
  }

  clearBodyDeadline (): void {
    if (this.bodyDeadline === null) return
    clearTimeout(this.bodyDeadline)
    this.bodyDeadline = null
  }

  /** Waiting on the client while holding an upstream connection (see `Upstream.held`). */
  private hold (): void {
    if (this.holding) return
    this.holding = true
    const upstream = this.upstream
    if (++upstream.held > upstream.maxHeld) {
      // A timer of the socket's own: exact, and rare enough to pay for.
      this.graced = true
      this.clientSocket.setTimeout(STALL_GRACE_MS)
      if (!this.timeoutListening) {
        this.timeoutListening = true
        this.res.on('timeout', onResponseTimeout)
      }
    }
  }

  release (): void {
    if (!this.holding) return
    this.holding = false
    this.upstream.held--
    if (this.graced) {
      this.graced = false
      // Back to the sweep alone (Node sets its keep-alive timeout once the response is done).
      if (this.state !== DONE) this.clientSocket.setTimeout(0)
    }
  }

  /**
   * Disconnect a client silent past the route's `idleTimeoutMs` (or STALL_GRACE_MS, see
   * `hold`). The close aborts the upstream request (`clientGone`): the client's failure,
   * nobody else's.
   */
  cutSlowClient (): void {
    this.dp.stats.clientError('slow_client')
    if (this.dp.logger.isLevelEnabled('debug')) {
      this.dp.logger.debug({ event: 'slow_client', route: this.route.name, upstream: this.upstream.name, requestId: this.head.requestId, graced: this.graced }, 'slow client disconnected')
    }
    this.res.destroy()
  }

  /** `fresh`: on a connection of its own rather than a pooled one (see `reusable`). */
  private dispatch (avoid: Endpoint | null, fresh: boolean): void {
    const endpoint = this.upstream.balancer.pick(avoid)
    if (endpoint === null) { this.failUpstream(NO_ENDPOINT); return }
    this.endpoint = endpoint
    endpoint.inFlight++
    this.attempt++
    const cfg = this.route.config
    const method = this.req.method as Dispatcher.HttpMethod
    const dispatcher = fresh || (!IDEMPOTENT.has(method) && !reusable(endpoint, performance.now()))
      ? freshConnection(endpoint, this.upstream)
      : endpoint.pool
    dispatcher.dispatch({
      path: this.route.upstreamPath(this.path),
      method,
      headers: this.head.headers,
      body: this.body ?? (this.head.hasBody ? this.req : null),
      // undici's headersTimeout runs from the request fully sent to the response headers:
      // exactly the route's timeoutMs (SPEC §14, a long upload is not a timeout).
      headersTimeout: cfg.timeoutMs,
      bodyTimeout: cfg.idleTimeoutMs,
      reset: this.draining()
    }, this)
    if (dispatcher !== endpoint.pool) dispatcher.close().catch(noop) // once this request is done
  }

  // ---- undici handler ----

  /** undici has a connection for the request and writes it next (after the wait in the pool's queue). */
  onConnect (abort: (err?: Error) => void): void {
    // Given up before a connection was free (a queue timeout, the client left) or killed
    // meanwhile: nothing of it is written yet. undici's `abort` would also destroy the connection
    // it has just freed for this request (under saturation, a reconnect per request given up);
    // an error thrown here fails the request alone (onError) and leaves the connection to the next.
    if (this.state === DONE) throw GIVEN_UP
    if (this.killedMeanwhile()) throw KILLED_MEANWHILE
    this.abortUpstream = abort
    if (this.body === null && this.head.hasBody) {
      // The client's silence counts from here: until now nothing read its upload.
      this.seenRead = -1
      // An upload streamed as the client sends it holds the connection until it is all sent.
      this.hold()
    }
  }

  onRequestSent (): void {
    this.requestSent = true
    const limit = this.route.config.timeoutMs
    if (limit > 0) this.headDueAt = performance.now() + limit
    this.release()
  }

  /** undici's parser saw the first byte of a response (its status line). */
  onResponseStarted (): void {
    this.responseStarted = true
  }

  onHeaders (statusCode: number, rawHeaders: Buffer[], resume: () => void, _statusText: string): boolean {
    // RFC 9110 §15.2: an interim response (103 Early Hints) comes before the final one on the
    // same exchange. It is not relayed (nginx's and Envoy's default): the client gets the final
    // response, and `timeoutMs` still runs until it comes.
    if (statusCode < 200) return true
    this.headDueAt = 0
    if (this.state === DONE) return false
    if (statusCode === 503 && this.mayRetry() && rawHeaderValue(rawHeaders, 'x-breakwater-mitigation') === null) {
      this.upstream.balancer.report(this.endpoint as Endpoint, 'upstream', performance.now()) // this attempt failed
      this.state = DISCARDING // read and drop the body, keep the connection, then retry
      return true
    }
    // RFC 9112 §6.1: undici decodes `chunked` and the body is framed again for the client, so a
    // coding before it (`gzip, chunked`) would go with the header while its coded bytes stayed
    // (nginx refuses such a response too). The request's side is refused the same way (headers.ts).
    const coding = rawHeaderValue(rawHeaders, 'transfer-encoding')
    if (coding !== null && coding.trim().toLowerCase() !== 'chunked') {
      this.dp.logger.warn({ event: 'invalid_upstream_response', route: this.route.name, upstream: this.upstream.name, err: `Transfer-Encoding: ${coding}` }, 'upstream response refused')
      this.refuseResponse(TRANSFER_CODING)
      return false
    }
    this.resumeUpstream = resume
    const res = this.res
    const headers = responseHeaders(rawHeaders, this.draining(), statusCode)
    try {
      res.writeHead(statusCode, headers)
    } catch (err) {
      // The upstream sent a header Node refuses to write (invalid characters).
      this.dp.logger.warn({ event: 'invalid_upstream_response', route: this.route.name, upstream: this.upstream.name, err: (err as Error).message }, 'upstream response refused')
      this.refuseResponse(INVALID_RESPONSE)
      return false
    }
    // The upstream's own 5xx is relayed to the client and still counted as its failure.
    this.source = 'upstream'
    this.conclude(statusCode, null, true)
    this.state = STREAMING
    const cache = this.route.fallback?.cache
    if (cache != null) this.capture = cache.capture(this.req, cacheKey(this), statusCode, headers)
    return true
  }

  /** An upstream response that cannot be relayed: its request fails with `err` (a 502 that says why). */
  private refuseResponse (err: Error): void {
    const abort = this.abortUpstream
    // undici tells its handler (onError) at once, and ends the request's connection.
    if (abort !== null) abort(err)
    else this.failUpstream(err)
  }

  onData (chunk: Buffer): boolean {
    if (this.state !== STREAMING) return this.state === DISCARDING
    if (this.capture !== null) this.capture.add(chunk)
    const res = this.res
    if (res.write(chunk) || res.writableLength <= RESPONSE_READ_AHEAD_BYTES) return true
    if (!this.drainListening) {
      this.drainListening = true
      res.on('drain', onResponseDrain)
    }
    // The client does not keep up: until it drains, the connection waits on it.
    this.hold()
    return false
  }

  onComplete (_trailers: string[] | null): void {
    const endpoint = this.endpoint as Endpoint
    endpoint.inFlight--
    this.release()
    if (this.state === DISCARDING) { this.retry(endpoint, false); return }
    if (this.state === DONE) return
    this.finish()
  }

  /** The response is all there: end it for the client. */
  private finish (): void {
    this.res.end()
    if (this.capture !== null) this.capture.complete(Date.now())
    this.done()
  }

  onError (err: Error): void {
    const endpoint = this.endpoint
    if (endpoint !== null) endpoint.inFlight--
    const state = this.state
    if (state === DONE) return
    if (state === STREAMING) {
      // A 204 or 304 that announced a length: complete at its head.
      if (endedAtHead(this.status, err)) {
        this.finish()
        return
      }
      // Headers are out: the only honest signal left is to cut the connection. The upstream
      // either broke the body off or stopped sending it for `idleTimeoutMs` (undici's bodyTimeout).
      this.conclude(this.status, this.dp.cutting ? 'shutdown_deadline' : (err as { code?: string }).code === 'UND_ERR_BODY_TIMEOUT' ? 'upstream_timeout' : 'upstream_reset')
      this.res.destroy()
      this.done()
      return
    }
    // The client's upload broke off (it left): its doing, not the upstream's.
    if (this.clientGone) { this.clientLeft(); return }
    // A connection cut after the response began is not a connect failure: the request reached
    // the app, which started to answer (SPEC §14 retries only before any response byte).
    if (state === WAITING && !this.responseStarted && isConnectFailure(err)) {
      // Provably unsent on a connection the upstream had closed: the keep-alive race, retried
      // on a fresh connection and nobody's failure.
      if (this.mayRetryUnsent(err)) { this.retry(endpoint, true); return }
      if (this.mayRetry()) {
        if (endpoint !== null) this.upstream.balancer.report(endpoint, 'upstream', performance.now()) // this attempt failed
        this.retry(endpoint, false)
        return
      }
    }
    if (this.dp.logger.isLevelEnabled('debug')) {
      this.dp.logger.debug({ event: 'upstream_error', route: this.route.name, upstream: this.upstream.name, endpoint: endpoint?.origin, code: (err as { code?: string }).code, err: err.message }, 'upstream error')
    }
    this.failUpstream(err)
  }

  // ---- retries ----

  private mayRetry (): boolean {
    if (this.head.hasBody || !IDEMPOTENT.has(this.req.method as string)) return false
    const retries = this.route.config.retries
    if (retries === null || this.attempt > retries.attempts) return false
    // Never into a circuit that opened meanwhile (SPEC §4: while open, the upstream sees nothing).
    const circuit = this.upstream.circuit
    if (circuit !== null && !circuit.readmits(this.pass)) return false
    const budget = this.route.retryBudget as NonNullable<Route['retryBudget']>
    if (budget.tryRetry(performance.now())) return true
    this.route.stats.retryBudgetExhausted++
    return false
  }

  /**
   * SPEC §14, the keep-alive race: a connection the upstream closed as we reused it fails
   * before any response byte. Retried once, on a fresh connection (another pooled one may be
   * closing too), with or without `retries`: idempotent requests whose body (if any) was
   * buffered always; others only when provably unsent — undici calls `onConnect` just before
   * it writes the first byte, so an error before it means nothing left. (Non-idempotent
   * requests avoid the race in the first place: see `reusable`.)
   */
  private mayRetryUnsent (err: unknown): boolean {
    if (this.attempt !== 1 || (this.head.hasBody && this.body === null)) return false
    const code = (err as { code?: string } | null)?.code
    if (code !== 'ECONNRESET' && code !== 'UND_ERR_SOCKET' && code !== 'EPIPE') return false
    return IDEMPOTENT.has(this.req.method as string) || this.abortUpstream === null
  }

  private retry (failed: Endpoint | null, fresh: boolean): void {
    this.state = WAITING
    this.abortUpstream = null
    this.requestSent = false
    this.responseStarted = false
    this.headDueAt = 0
    this.route.stats.retries++
    this.dispatch(failed, fresh)
  }

  // ---- endings (the accounting is the context's `end`) ----

  /** The client closed its connection before the response was complete. */
  override clientLeft (): void {
    const abort = this.abortUpstream
    // After the head, the status it got stands; a good one is not a success (context.ts `leftDuringBody`).
    if (this.state !== STREAMING) this.conclude(CLIENT_CLOSED, null)
    else this.leftDuringBody()
    this.done()
    if (abort !== null) abort()
  }

  /**
   * The HTTP parser refused bytes of this request's body (chunked framing broken mid-upload,
   * server.ts): its upstream request is given up and the client gets the 400 as this request's
   * answer, logged and counted as sent, and the connection closes.
   */
  refuseBody (why: string): void {
    const abort = this.abortUpstream
    this.res.shouldKeepAlive = false
    this.refuse('bad_request', why)
    if (abort !== null) abort()
  }

  /**
   * `OPTIONS *` (RFC 9110 §9.3.7): an empty `200` of Breakwater's own, for the server in general
   * (no `Allow`: what the app supports is per resource).
   */
  answerServerOptions (): void {
    const headers = ['content-length', '0', 'x-request-id', this.requestId]
    if (this.closeAfter()) headers.push('connection', 'close')
    this.res.writeHead(200, headers)
    this.res.end()
    this.conclude(200, null)
    this.end()
  }

  protected respond (code: ErrorCode, status: number, message: string | undefined, extra: string[] | undefined): void {
    const res = this.res
    if (res.headersSent || res.destroyed) return
    sendError(res, code, this.requestId, this.closeAfter(), extra, message, status)
  }

  protected override degrade (fallback: Fallback): number {
    const res = this.res
    if (res.headersSent || res.destroyed) return 0
    // Headers say what answered: a degraded answer is the cache's or the route's, never the
    // failover upstream's; our own refusal, if there is nothing to serve, still names it.
    const failover = res.getHeader('x-breakwater-failover')
    if (failover !== undefined) res.removeHeader('x-breakwater-failover')
    const kind = fallback.serve(this.req, res, cacheKey(this), this.requestId, this.closeAfter(), this.route.stats)
    if (kind === null) {
      if (failover !== undefined) res.setHeader('x-breakwater-failover', failover)
      return 0
    }
    this.fallback = kind
    return res.statusCode
  }

  /** Its listener is draining (the egress listener never is: SPEC §14). */
  private draining (): boolean {
    return this.dp.draining && this.listener === 'proxy'
  }

  /** A request body we will not read must not stall the connection: close it after answering. */
  private closeAfter (): boolean {
    const req = this.req
    return this.draining() || (!req.complete && ((req.headers['content-length'] !== undefined && req.headers['content-length'] !== '0') || req.headers['transfer-encoding'] !== undefined))
  }

  /** Ends every path of the request: local answers (through `refuse`) and relayed responses. */
  protected override end (): void {
    this.state = DONE
    // A body not stored by now never will be (cut, failed, the client left): its chunks go.
    if (this.capture !== null) { this.capture.abandon(); this.capture = null }
    this.dp.silence.unwatch(this)
    super.end()
  }

  private done (): void {
    // Ended while its body was still arriving (the client left or was cut).
    if (this.afterBody !== null) {
      this.afterBody = null
      this.dp.stats.receiving--
    }
    this.end()
  }
}

/**
 * The exchange whose request body is being read on the connection of `res`, when the parser
 * refuses its bytes before any response head went out; null otherwise (a request behind it, or
 * one no stage follows yet, is refused by the server as bytes that are not a request).
 */
export function readingBody (res: ServerResponse): Exchange | null {
  const ex = (res as Tagged)[kExchange]
  return ex === undefined || ex.state === DONE || res.headersSent || ex.req.complete ? null : ex
}

/** The fallback cache's key for an exchange: its host as routes read it, and its normalised path. */
function cacheKey (ex: Exchange): string {
  return requestHostKey(ex.head) + '\u0000' + ex.path
}
