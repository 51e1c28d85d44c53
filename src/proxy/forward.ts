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
 */
import type { IncomingMessage, ServerResponse } from 'node:http'
import type { Dispatcher } from 'undici'
import type { DataPlane } from './dataplane.js'
import type { Route } from './route-table.js'
import type { Endpoint } from './balancer.js'
import type { RequestHead } from './headers.js'
import { responseHeaders, rawHeaderValue } from './headers.js'
import { fromUpstreamError, isConnectFailure, sendError, type ErrorCode } from './errors.js'
import type { Circuit, Settle } from './circuit-breaker.js'
import { freshConnection, reusable } from './upstreams.js'

const kExchange = Symbol('breakwater.exchange')
type Tagged = ServerResponse & { [kExchange]?: Exchange }

/** RFC 9110 §9.2.2: methods whose repetition has the same effect. */
const IDEMPOTENT = new Set(['GET', 'HEAD', 'OPTIONS', 'TRACE', 'PUT', 'DELETE'])

const WAITING = 0 // dispatched, no response headers yet
const STREAMING = 1 // response headers sent to the client
const DISCARDING = 2 // reading a retriable 503's body before trying again
const DONE = 3

/** Client-closed-request, as nginx and Envoy log it; never sent on the wire. */
export const CLIENT_CLOSED = 499

function noop (): void {}

function onResponseClose (this: Tagged): void {
  const ex = this[kExchange]
  if (ex !== undefined && ex.state !== DONE) ex.clientGone()
}

function onResponseDrain (this: Tagged): void {
  const resume = this[kExchange]?.resumeUpstream
  if (resume != null) resume()
}

export class Exchange implements Dispatcher.DispatchHandler {
  state = WAITING
  /** Set by `start`: a breaker that refused to run it leaves it false. */
  started = false
  readonly dp: DataPlane
  readonly route: Route
  readonly req: IncomingMessage
  readonly res: Tagged
  readonly head: RequestHead
  readonly path: string
  readonly startedAt: number
  endpoint: Endpoint | null = null
  attempt = 0
  status = 0
  errorCode: ErrorCode | 'upstream_reset' | null = null
  /** An injected fault this request carries (game days), for the access log. */
  fault: 'delay' | null = null
  /** The breaker's settle hook, until the outcome is reported. */
  settle: Settle | null = null
  abortUpstream: ((err?: Error) => void) | null = null
  resumeUpstream: (() => void) | null = null
  private drainListening = false

  constructor (dp: DataPlane, route: Route, req: IncomingMessage, res: ServerResponse, head: RequestHead, path: string, startedAt: number) {
    this.dp = dp
    this.route = route
    this.req = req
    this.res = res as Tagged
    this.head = head
    this.path = path
    this.startedAt = startedAt
  }

  /** Start the exchange: pick an endpoint and dispatch. `settle` is set when a breaker watches it. */
  start (settle: Settle | null): void {
    this.started = true
    this.settle = settle
    const res = this.res
    res[kExchange] = this
    res.on('close', onResponseClose)
    // An aborted upload emits 'error' on the request; undici reports it to us through onError.
    if (this.head.hasBody) this.req.on('error', noop)
    this.route.upstream.inFlight++
    this.dp.stats.inFlight++
    if (this.route.retryBudget !== null) this.route.retryBudget.request(Date.now())
    this.dispatch(null, false)
  }

  /** `fresh`: on a connection of its own rather than a pooled one (see `reusable`). */
  private dispatch (avoid: Endpoint | null, fresh: boolean): void {
    const endpoint = this.route.upstream.balancer.pick(avoid)
    if (endpoint === null) { this.fail('upstream_unavailable'); return }
    this.endpoint = endpoint
    endpoint.inFlight++
    this.attempt++
    const cfg = this.route.config
    const method = this.req.method as Dispatcher.HttpMethod
    const dispatcher = fresh || (!IDEMPOTENT.has(method) && !reusable(endpoint, performance.now()))
      ? freshConnection(endpoint, this.route.upstream.config)
      : endpoint.pool
    dispatcher.dispatch({
      path: this.route.upstreamPath(this.path),
      method,
      headers: this.head.headers,
      body: this.head.hasBody ? this.req : null,
      // undici's headersTimeout runs from the request fully sent to the response headers:
      // exactly the route's timeoutMs (SPEC §14, a long upload is not a timeout).
      headersTimeout: cfg.timeoutMs,
      bodyTimeout: cfg.idleTimeoutMs,
      reset: this.dp.draining
    }, this)
    if (dispatcher !== endpoint.pool) dispatcher.close().catch(noop) // once this request is done
  }

  // ---- undici handler ----

  onConnect (abort: (err?: Error) => void): void {
    if (this.state === DONE) { abort(); return }
    this.abortUpstream = abort
  }

  onHeaders (statusCode: number, rawHeaders: Buffer[], resume: () => void, _statusText: string): boolean {
    if (this.state === DONE) return false
    const endpoint = this.endpoint as Endpoint
    const now = performance.now()
    this.route.upstream.balancer.report(endpoint, statusCode < 500, now)
    if (statusCode === 503 && this.mayRetry() && rawHeaderValue(rawHeaders, 'x-breakwater-mitigation') === null) {
      this.state = DISCARDING // read and drop the body, keep the connection, then retry
      return true
    }
    // The upstream's own 5xx is relayed to the client and still counted by its breaker.
    if (this.settle !== null) this.outcome(statusCode, false)
    this.route.stats.outcome(performance.timeOrigin + now, statusCode >= 500, now - this.startedAt)
    this.resumeUpstream = resume
    this.status = statusCode
    const res = this.res
    try {
      res.writeHead(statusCode, responseHeaders(rawHeaders, this.dp.draining))
    } catch (err) {
      // The upstream sent a header Node refuses to write (invalid characters).
      this.dp.logger.warn({ event: 'invalid_upstream_response', route: this.route.name, upstream: this.route.upstream.name, err: (err as Error).message }, 'upstream response refused')
      this.abortUpstream?.()
      this.fail('upstream_unavailable')
      return false
    }
    this.state = STREAMING
    return true
  }

  onData (chunk: Buffer): boolean {
    if (this.state !== STREAMING) return this.state === DISCARDING
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
    if (this.state === DISCARDING) { this.retry(endpoint, false); return }
    if (this.state === DONE) return
    this.res.end()
    this.done()
  }

  onError (err: Error): void {
    const endpoint = this.endpoint
    if (endpoint !== null) endpoint.inFlight--
    const state = this.state
    if (state === DONE) return
    if (state === STREAMING) {
      // Headers are out: the only honest signal left is to cut the connection.
      this.errorCode = 'upstream_reset'
      if (endpoint !== null) this.route.upstream.balancer.report(endpoint, false, performance.now())
      this.res.destroy()
      this.done()
      return
    }
    if (endpoint !== null) this.route.upstream.balancer.report(endpoint, false, performance.now())
    if (state === WAITING && isConnectFailure(err)) {
      if (this.mayRetryUnsent(err)) { this.retry(endpoint, true); return }
      if (this.mayRetry()) { this.retry(endpoint, false); return }
    }
    if (this.dp.logger.isLevelEnabled('debug')) {
      this.dp.logger.debug({ event: 'upstream_error', route: this.route.name, upstream: this.route.upstream.name, endpoint: endpoint?.origin, code: (err as { code?: string }).code, err: err.message }, 'upstream error')
    }
    this.fail(fromUpstreamError(err))
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
   * SPEC §14, the keep-alive race: a connection the upstream closed as we reused it fails
   * before any response byte. Retried once, on a fresh connection (another pooled one may be
   * closing too), with or without `retries`: idempotent requests without a body always;
   * others only when provably unsent — undici calls `onConnect` just before it writes the
   * first byte, so an error before it means nothing left. (Non-idempotent requests avoid
   * the race in the first place: see `reusable`.)
   */
  private mayRetryUnsent (err: unknown): boolean {
    if (this.attempt !== 1 || this.head.hasBody) return false
    const code = (err as { code?: string } | null)?.code
    if (code !== 'ECONNRESET' && code !== 'UND_ERR_SOCKET' && code !== 'EPIPE') return false
    return IDEMPOTENT.has(this.req.method as string) || this.abortUpstream === null
  }

  private retry (failed: Endpoint | null, fresh: boolean): void {
    this.state = WAITING
    this.abortUpstream = null
    this.route.stats.retries++
    this.dispatch(failed, fresh)
  }

  // ---- endings ----

  /** The client closed its connection before the response was complete. */
  clientGone (): void {
    if (this.settle !== null) this.outcome(0, true)
    const abort = this.abortUpstream
    this.status = this.state === STREAMING ? this.status : CLIENT_CLOSED
    this.errorCode = null
    this.done()
    if (abort !== null) abort()
  }

  private fail (code: ErrorCode): void {
    if (this.settle !== null) this.outcome(0, false)
    const now = performance.now()
    this.route.stats.outcome(performance.timeOrigin + now, true, now - this.startedAt)
    this.errorCode = code
    const res = this.res
    if (!res.headersSent && !res.destroyed) {
      sendError(res, code, this.head.requestId, this.dp.draining)
    }
    this.status = code === 'upstream_timeout' ? 504 : code === 'upstream_unavailable' ? 502 : 503
    this.done()
  }

  /** Report the request's outcome to its breaker, once. */
  private outcome (status: number, clientGone: boolean): void {
    const settle = this.settle as Settle
    this.settle = null;
    (this.route.upstream.circuit as Circuit).report(settle, { status, clientGone })
  }

  private done (): void {
    this.state = DONE
    const dp = this.dp
    dp.stats.inFlight--
    this.route.upstream.inFlight--
    const seconds = (performance.now() - this.startedAt) / 1000
    this.route.stats.record(this.status, seconds)
    const rate = dp.accessLogRate
    if (rate > 0 && (rate >= 1 || Math.random() < rate)) {
      dp.logger.info({
        requestId: this.head.requestId,
        method: this.req.method,
        path: pathOnly(this.path),
        route: this.route.name,
        upstream: this.route.upstream.name,
        endpoint: this.endpoint?.origin,
        status: this.status,
        durationMs: Math.round(seconds * 1e6) / 1e3,
        attempts: this.attempt,
        error: this.errorCode ?? undefined,
        fault: this.fault ?? undefined
      }, 'request')
    }
  }
}

function pathOnly (path: string): string {
  const q = path.indexOf('?')
  return q === -1 ? path : path.slice(0, q)
}
