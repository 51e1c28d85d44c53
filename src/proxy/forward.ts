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
import type { Dispatcher } from 'undici'
import type { DataPlane } from './dataplane.js'
import type { Route } from './route-table.js'
import type { Upstream } from './upstreams.js'
import type { Fallback, Capture } from './fallback.js'
import type { Endpoint } from './balancer.js'
import type { RequestHead } from './headers.js'
import { responseHeaders, rawHeaderValue } from './headers.js'
import { isConnectFailure, sendError, NO_ENDPOINT, INVALID_RESPONSE, type ErrorCode } from './errors.js'
import { RequestContext, CLIENT_CLOSED } from './context.js'

const kExchange = Symbol('breakwater.exchange')
type Tagged = ServerResponse & { [kExchange]?: Exchange }

/** RFC 9110 §9.2.2: methods whose repetition has the same effect. */
const IDEMPOTENT = new Set(['GET', 'HEAD', 'OPTIONS', 'TRACE', 'PUT', 'DELETE'])

const WAITING = 0 // dispatched, no response headers yet
const STREAMING = 1 // response headers sent to the client
const DISCARDING = 2 // reading a retriable 503's body before trying again
const DONE = 3

function noop (): void {}

function onResponseClose (this: Tagged): void {
  const ex = this[kExchange]
  if (ex !== undefined && ex.state !== DONE) ex.clientLeft()
}

function onResponseDrain (this: Tagged): void {
  const resume = this[kExchange]?.resumeUpstream
  if (resume != null) resume()
}

export class Exchange extends RequestContext implements Dispatcher.DispatchHandler {
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
  private drainListening = false

  constructor (dp: DataPlane, req: IncomingMessage, res: ServerResponse) {
    super(dp, req, false)
    this.res = res as Tagged
  }

  get clientGone (): boolean {
    return this.res.destroyed
  }

  /** Start the exchange: pick an endpoint and dispatch. */
  start (): void {
    this.begin()
    const res = this.res
    res[kExchange] = this
    res.on('close', onResponseClose)
    // An aborted upload emits 'error' on the request; undici reports it to us through onError.
    if (this.head.hasBody) this.req.on('error', noop)
    if (this.route.retryBudget !== null) this.route.retryBudget.request(Date.now())
    this.dispatch(null)
  }

  private dispatch (avoid: Endpoint | null): void {
    const endpoint = this.upstream.balancer.pick(avoid)
    if (endpoint === null) { this.failUpstream(NO_ENDPOINT); return }
    this.endpoint = endpoint
    endpoint.inFlight++
    this.attempt++
    const cfg = this.route.config
    endpoint.pool.dispatch({
      path: this.route.upstreamPath(this.path),
      method: this.req.method as Dispatcher.HttpMethod,
      headers: this.head.headers,
      body: this.head.hasBody ? this.req : null,
      // undici's headersTimeout runs from the request fully sent to the response headers:
      // exactly the route's timeoutMs (SPEC §14, a long upload is not a timeout).
      headersTimeout: cfg.timeoutMs,
      bodyTimeout: cfg.idleTimeoutMs,
      reset: this.dp.draining
    }, this)
  }

  // ---- undici handler ----

  onConnect (abort: (err?: Error) => void): void {
    if (this.state === DONE) { abort(); return }
    this.abortUpstream = abort
  }

  onHeaders (statusCode: number, rawHeaders: Buffer[], resume: () => void, _statusText: string): boolean {
    if (this.state === DONE) return false
    if (statusCode === 503 && this.mayRetry() && rawHeaderValue(rawHeaders, 'x-breakwater-mitigation') === null) {
      this.upstream.balancer.report(this.endpoint as Endpoint, 'upstream', performance.now()) // this attempt failed
      this.state = DISCARDING // read and drop the body, keep the connection, then retry
      return true
    }
    this.resumeUpstream = resume
    const res = this.res
    const headers = responseHeaders(rawHeaders, this.dp.draining)
    try {
      res.writeHead(statusCode, headers)
    } catch (err) {
      // The upstream sent a header Node refuses to write (invalid characters).
      this.dp.logger.warn({ event: 'invalid_upstream_response', route: this.route.name, upstream: this.upstream.name, err: (err as Error).message }, 'upstream response refused')
      this.abortUpstream?.()
      this.failUpstream(INVALID_RESPONSE)
      return false
    }
    // The upstream's own 5xx is relayed to the client and still counted as its failure.
    this.source = 'upstream'
    this.conclude(statusCode, null)
    this.state = STREAMING
    const cache = this.route.fallback?.cache
    if (cache != null) this.capture = cache.capture(this.req, cacheKey(this), statusCode, headers)
    return true
  }

  onData (chunk: Buffer): boolean {
    if (this.state !== STREAMING) return this.state === DISCARDING
    if (this.capture !== null) this.capture.add(chunk)
    if (this.res.write(chunk)) return true
    if (!this.drainListening) {
      this.drainListening = true
      this.res.on('drain', onResponseDrain)
    }
    return false
  }

  onComplete (_trailers: string[] | null): void {
    const endpoint = this.endpoint as Endpoint
    endpoint.inFlight--
    if (this.state === DISCARDING) { this.retry(endpoint); return }
    if (this.state === DONE) return
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
      // Headers are out: the only honest signal left is to cut the connection.
      this.conclude(this.status, 'upstream_reset')
      this.res.destroy()
      this.done()
      return
    }
    // The client's upload broke off (it left): its doing, not the upstream's.
    if (this.clientGone) { this.clientLeft(); return }
    if (state === WAITING && isConnectFailure(err) && (this.mayRetry() || this.mayRetryReset(err))) {
      if (endpoint !== null) this.upstream.balancer.report(endpoint, 'upstream', performance.now()) // this attempt failed
      this.retry(endpoint)
      return
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
    const budget = this.route.retryBudget as NonNullable<Route['retryBudget']>
    if (budget.tryRetry(Date.now())) return true
    this.route.stats.retryBudgetExhausted++
    return false
  }

  /**
   * SPEC §14: a reset before any response byte (typically a keep-alive connection the
   * upstream closed as we reused it) is retried once for idempotent requests without a body,
   * with or without `retries`.
   */
  private mayRetryReset (err: unknown): boolean {
    if (this.attempt !== 1 || this.head.hasBody || !IDEMPOTENT.has(this.req.method as string)) return false
    const code = (err as { code?: string } | null)?.code
    return code === 'ECONNRESET' || code === 'UND_ERR_SOCKET' || code === 'EPIPE'
  }

  private retry (failed: Endpoint | null): void {
    this.state = WAITING
    this.abortUpstream = null
    this.route.stats.retries++
    this.dispatch(failed)
  }

  // ---- endings (the accounting is the context's `end`) ----

  /** The client closed its connection before the response was complete. */
  override clientLeft (): void {
    const abort = this.abortUpstream
    // After the head the upstream has answered: the cause stands (context.ts).
    if (this.state !== STREAMING) this.conclude(CLIENT_CLOSED, null)
    this.done()
    if (abort !== null) abort()
  }

  protected respond (code: ErrorCode, status: number, message: string | undefined, extra: string[] | undefined): void {
    const res = this.res
    if (res.headersSent || res.destroyed) return
    sendError(res, code, this.requestId, this.closeAfter(), extra, message, status)
  }

  protected override degrade (fallback: Fallback): number {
    const res = this.res
    if (res.headersSent || res.destroyed) return 0
    const kind = fallback.serve(this.req, res, cacheKey(this), this.requestId, this.closeAfter(), this.route.stats)
    if (kind === null) return 0
    this.fallback = kind
    return res.statusCode
  }

  /** A request body we will not read must not stall the connection: close it after answering. */
  private closeAfter (): boolean {
    const req = this.req
    return this.dp.draining || (!req.complete && ((req.headers['content-length'] !== undefined && req.headers['content-length'] !== '0') || req.headers['transfer-encoding'] !== undefined))
  }

  /** Ends every path of the request: local answers (through `refuse`) and relayed responses. */
  protected override end (): void {
    this.state = DONE
    super.end()
  }

  private done (): void {
    this.end()
  }
}

/** The fallback cache's key for an exchange: its host and normalised path. */
function cacheKey (ex: Exchange): string {
  return ex.head.host + '\u0000' + ex.path
}
