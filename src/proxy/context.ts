/**
 * One request, from admission to its accounting: the per-request object every stage of
 * pipeline.ts reads and fills in (Envoy's StreamInfo), and the one outcome model (SPEC §15).
 * The forward stage's `Exchange` (forward.ts) and the WebSocket `Tunnel` (upgrade.ts) are its
 * two kinds: one object per request, created at admission.
 *
 * Every request ends with one cause:
 *
 *   ok          the upstream answered with a status outside `failureStatuses`
 *   upstream    connect refused or reset, timeout, a status in `failureStatuses` (default 500,
 *               502, 503, 504), a response body cut short
 *   client      the client left before the response was complete (after a good head), or
 *               sent a request that cannot be forwarded (400 before any upstream contact)
 *   breakwater  a local refusal: overload, no route, kill switch, rate limit, injected fault,
 *               circuit open, bulkhead; or a local answer no upstream was asked for (`OPTIONS *`)
 *
 * `conclude` decides it, in one place, the moment it is known: at the response head, at a
 * failure before it, when the client leaves first, or at a local answer. It tells the
 * upstream's breaker and the endpoint's passive ejection then, except for a response that
 * looks good at its head: its body may still be cut, so they hear of it when it ends. `end`
 * does the accounting once.
 * Who counts what:
 *
 *   breaker, ejection   upstream = failure, ok = success, client and breakwater = neither
 *                       (a client that leaves never closes a half-open circuit, never dilutes)
 *   trigger windows     upstream = error, ok = request, client = nothing; breakwater = nothing,
 *                       except a refusal by a circuit that failures opened (users saw an outage,
 *                       SPEC §14) and an injected abort (a game day stands in for the upstream)
 *   metrics, log        every request: `breakwater_requests_total{source}` says who produced the
 *                       status, the access-log line carries `outcome`
 *
 * A degraded answer (a route's `fallback` served instead of a refusal or an upstream failure,
 * fallback.ts) keeps the cause the refusal would have had: the client got a stale or static
 * response, but the breaker, the ejection and the trigger windows see the failure it hides.
 *
 * A client that leaves after a good head, before the body is all there, makes the cause
 * `client` (the status it got stands); after a failure status the cause stays `upstream`. An
 * upstream that cuts the body after a good head, or stops sending it for `idleTimeoutMs`, makes
 * it `upstream` for everyone: one result per request, the final one. A
 * half-open probe is the exception: it is judged on its head, so that the circuit closes
 * without waiting for a long body; a body cut after that counts as one failure in the window
 * its close opened, and is dropped if the circuit has opened again since.
 */
import type { IncomingMessage } from 'node:http'
import type { Socket } from 'node:net'
import type { DataPlane } from './dataplane.js'
import type { Route } from './route-table.js'
import type { Endpoint } from './balancer.js'
import { isOwnProbe, type RequestHead } from './headers.js'
import type { Pass } from './circuit-breaker.js'
import type { Upstream } from './upstreams.js'
import type { Listener } from '../config/types.js'
import type { Fallback } from './fallback.js'
import { DEGRADABLE } from './fallback.js'
import { ERRORS, KILLED_MEANWHILE, fromUpstreamError, failureReason, upstreamMessage, type ErrorCode } from './errors.js'
import { killSwitchAllows } from './kill-switch.js'
import { jsonString, jsonNumber, jsonMillis, JsonMembers, type LaterLine } from '../log/lines.js'
import { httpRoute, errorType, isServerError, hostAddress, requestHost, peerAddress, userAgent, requestMethod, type SpanExport } from './trace.js'
import { clientAddress } from './rate-limit.js'
import { windowMsAt } from './window.js'

export type Cause = 'ok' | 'upstream' | 'client' | 'breakwater'

/** Who produced the status a request ended with (the `source` metric label). */
export type Source = 'upstream' | 'breakwater'

/** Client-closed-request, as nginx and Envoy log it; never sent on the wire. */
export const CLIENT_CLOSED = 499

/** The local code, or `upstream_reset`: the upstream cut a response whose head was sent. */
export type EndingError = ErrorCode | 'upstream_reset'

/** `RequestContext.unjudged`: nothing waits; a good head waits for its end; and its probe was settled on it. */
const JUDGED = 0
const HEAD_OK = 1
const HEAD_OK_PROBED = 2

/** `failureStatuses` of an upstream without a breaker (SPEC §4's default). */
const DEFAULT_FAILURE_STATUSES = new Uint8Array(600)
for (const s of [500, 502, 503, 504]) DEFAULT_FAILURE_STATUSES[s] = 1

export abstract class RequestContext implements LaterLine {
  readonly dp: DataPlane
  readonly req: IncomingMessage
  /** The client's connection (`req.socket` is let go once a request is consumed; the log and span read it at the end). */
  readonly clientSocket: Socket
  /** `performance.now()` at admission. */
  readonly startedAt: number
  /** The request target as received; the normalised path (with its query) once normalised. */
  path: string
  /** The listener the request came in on (set at admission). */
  listener: Listener = 'proxy'
  /** Set by the normalise stage. */
  head: RequestHead | null = null
  /** Set by the match stage. */
  route: Route | null = null
  /** Set by the match stage: the route's upstream, or its failover's (the failover stage). */
  upstream: Upstream | null = null
  /** The endpoint of the last attempt. */
  endpoint: Endpoint | null = null
  attempt = 0
  /** The status the client got (or `CLIENT_CLOSED`). */
  status = 0
  source: Source = 'breakwater'
  cause: Cause | null = null
  errorCode: EndingError | null = null
  /** An injected fault this request carries (game days). */
  fault: 'abort' | 'delay' | null = null
  /** A degraded answer was served instead (fallback.ts). */
  fallback: 'stale' | 'static' | null = null
  /** Its pass through the upstream's breaker, until the cause is known. */
  pass: Pass | null = null
  /** A good response head not yet told to the breaker and the ejection (`conclude`). */
  private unjudged = JUDGED
  /** The half-open probe this request was, settled on its good head (`HEAD_OK_PROBED`). */
  private probe: Pass | null = null
  /** Refused by a circuit that failures opened (an error for triggers, SPEC §14). */
  outage = false
  /** Milliseconds from admission to the response head (ours or the upstream's); -1 before. */
  headMs = -1
  /** Counted in flight to the upstream (the bulkhead's count) since `begin`. */
  started = false
  /** W3C trace context (trace.ts): lower-case hex, '' when none. With tracing off, `spanId` is the caller's. */
  traceId = ''
  spanId = ''
  parentSpanId = ''
  /** Where this request's span goes when it ends; null unless tracing is on and it is sampled. */
  spanExport: SpanExport | null = null
  /** A WebSocket handshake (a `Tunnel`), for the access log. */
  readonly upgrade: boolean
  private madeId = ''
  private ended = false
  /**
   * `network.peer.address` and `client.address` of the span and the access line: the peer, and
   * the client it forwards for when it is a trusted proxy (else the peer). Read at `end` (both
   * are made later, when the socket may be gone).
   */
  peer: string | undefined = undefined
  clientAddress: string | undefined = undefined
  /** For the access-log line, made after `end`: when it ended (ms since the epoch) and its duration (s). */
  private loggedAt = 0
  private loggedSeconds = 0

  constructor (dp: DataPlane, req: IncomingMessage, upgrade: boolean) {
    this.dp = dp
    this.req = req
    this.clientSocket = req.socket
    this.upgrade = upgrade
    this.startedAt = performance.now()
    this.path = req.url as string
  }

  /** True once the client has gone away. */
  abstract get clientGone (): boolean

  /** The forward stage: send the request to the route's upstream. */
  abstract start (): void

  /** Write a locally generated response (when the client can still get one). */
  protected abstract respond (code: ErrorCode, status: number, message: string | undefined, extra: string[] | undefined): void

  /** The client's `x-request-id` or ours; made here for a request refused before its head was read. */
  get requestId (): string {
    if (this.head !== null) return this.head.requestId
    if (this.madeId === '') this.madeId = this.dp.newRequestId()
    return this.madeId
  }

  /** Answer with a local response (SPEC §3's table) and end the request. */
  refuse (code: ErrorCode, message?: string, extra?: string[], status: number = ERRORS[code].status): void {
    // A request that cannot be forwarded as sent (400, 431), whichever stage found it: counted
    // with what the HTTP parser refuses (server.ts), once.
    if (ERRORS[code].cause === 'client') this.dp.stats.clientError(code)
    const fallback = this.route?.fallback
    if (fallback != null && DEGRADABLE.has(code)) {
      const served = this.degrade(fallback)
      if (served !== 0) {
        // The user is served; the cause stays the refusal's (the breaker and triggers see it).
        this.conclude(served, code)
        this.end()
        return
      }
    }
    this.respond(code, status, message, extra)
    this.conclude(status, code)
    this.end()
  }

  /** Answer with the route's fallback instead; the status sent, or 0 when it has none to give. */
  protected degrade (_fallback: Fallback): number {
    return 0
  }

  /**
   * The upstream request failed before a response: 502/504 saying which upstream failed how,
   * or 400 when undici refused to send the request itself (the client's doing).
   */
  failUpstream (err: unknown): void {
    if (err === KILLED_MEANWHILE) {
      ;(this.route as Route).stats.reject('kill_switch')
      this.refuse('feature_disabled')
      return
    }
    // The pools closed under it at the shutdown deadline: the app did not fail.
    if (this.dp.cutting) {
      this.refuse('shutdown_deadline')
      return
    }
    const code = fromUpstreamError(err)
    if (code === 'bad_request') {
      this.refuse(code, `the request cannot be forwarded: ${(err as Error).message}`)
      return
    }
    const route = this.route as Route
    this.refuse(code, upstreamMessage((this.upstream as Upstream).name, this.endpoint?.origin ?? null, failureReason(err, route.config.timeoutMs)))
  }

  /**
   * The route's kill switch asked again as the request is about to be written upstream
   * (undici's `onConnect`, once per attempt). The pipeline's stage asked when the request came
   * in; since then it may have waited for its body, an injected delay, a free connection or a
   * retry. A kill that lands meanwhile must stop it before the killed feature sees it: the
   * operator was told the feature is off (SPEC §5). Aborted with `KILLED_MEANWHILE`, it is
   * refused `feature_disabled` (`failUpstream`).
   */
  killedMeanwhile (): boolean {
    return !killSwitchAllows(this.dp.flags, this.route as Route, this.req.method as string, this.path, this.head as RequestHead)
  }

  /** The client left before the response started. */
  clientLeft (): void {
    this.conclude(CLIENT_CLOSED, null)
    this.end()
  }

  /**
   * The client left while the body of a response with a good head was still coming (a stalled
   * body, a download given up): the status it got stands, as Envoy (`DC`) and HAProxy (`CD`) log
   * it, but the cause is the client's. A response nobody took whole is not the upstream's success:
   * impatient clients of a body that hangs must not keep its circuit closed. A failure status
   * stays the upstream's failure.
   */
  protected leftDuringBody (): void {
    if (this.cause === 'ok') this.cause = 'client'
  }

  /** Count this request in flight to its upstream (the bulkhead) until it ends. */
  protected begin (): void {
    this.started = true
    ;(this.upstream as Upstream).inFlight++
    this.dp.stats.inFlight++
  }

  /**
   * The one place a request's cause is decided (SPEC §15), from the status the client got and
   * the local code, if any. The first call fixes it and tells the breaker and the ejection; a
   * later one only turns an `ok` into `upstream` (a body cut short), or into `breakwater` (a body
   * cut by the shutdown deadline). `atHead`: the status of a
   * response whose body is still to come, told to them when it ends if it is `ok`.
   */
  protected conclude (status: number, error: EndingError | null, atHead = false): void {
    const cause: Cause = error === 'upstream_reset'
      ? 'upstream'
      : error !== null
        ? ERRORS[error].cause
        : status === CLIENT_CLOSED
          ? 'client'
          // Answered here with no upstream asked (`OPTIONS *`): Breakwater's answer, not the app's success.
          : this.upstream === null ? 'breakwater' : this.isFailureStatus(status) ? 'upstream' : 'ok'
    // A good head's body cut later: by the upstream, or by the shutdown deadline (ours).
    if (this.cause !== null && !(this.cause === 'ok' && (cause === 'upstream' || error === 'shutdown_deadline'))) return
    this.cause = cause
    this.status = status
    this.errorCode = error
    const now = performance.now()
    if (this.headMs < 0) this.headMs = now - this.startedAt
    const upstream = this.upstream
    if (upstream === null) return
    if (atHead && cause === 'ok') {
      const pass = this.pass
      if (pass !== null && (upstream.circuit as NonNullable<typeof upstream.circuit>).settleHead(pass)) {
        this.pass = null
        this.probe = pass
        this.unjudged = HEAD_OK_PROBED
      } else {
        this.unjudged = HEAD_OK
      }
      return
    }
    this.judge(upstream, cause, now)
  }

  /** Tell the upstream's breaker and the endpoint's passive ejection how this request ended. */
  private judge (upstream: Upstream, cause: Cause, now: number): void {
    const probed = this.unjudged === HEAD_OK_PROBED
    this.unjudged = JUDGED
    if (this.endpoint !== null) upstream.balancer.report(this.endpoint, cause, now, this.startedAt + this.headMs)
    const circuit = upstream.circuit
    if (circuit == null) return
    const pass = this.pass
    if (pass !== null) {
      this.pass = null
      circuit.settle(pass, cause)
    } else if (probed && cause === 'upstream') {
      circuit.lateFailure(this.probe as Pass)
    }
  }

  /** A status of the upstream's own: in its `failureStatuses`? */
  private isFailureStatus (status: number): boolean {
    const circuit = this.upstream?.circuit
    return circuit != null && circuit.automatic ? circuit.isFailureStatus(status) : DEFAULT_FAILURE_STATUSES[status] === 1
  }

  /** The accounting, once per request: route stats and histogram, trigger window, access log. */
  protected end (): void {
    if (this.ended) return
    this.ended = true
    const dp = this.dp
    const route = this.route
    if (this.started) {
      dp.stats.inFlight--
      ;(this.upstream as Upstream).inFlight--
    }
    if (this.cause === null) this.conclude(CLIENT_CLOSED, null) // every ending concludes first; never left undecided
    const endedAt = performance.now() // one clock read for the judgement and the duration
    if (this.unjudged !== JUDGED) this.judge(this.upstream as Upstream, this.cause as Cause, endedAt)
    const seconds = (endedAt - this.startedAt) / 1000
    const stats = route === null ? dp.stats.route('', '') : route.stats
    stats.record(this.status, seconds, this.source)
    // The upstream's head went out, then its body broke off or stalled: the client's connection
    // was cut, whatever status the head carried.
    const error = this.errorCode
    if (this.source === 'upstream' && (error === 'upstream_reset' || error === 'upstream_timeout')) stats.cut(this.status, error)
    // In the trigger windows: -1 not at all, 0 a request, 1 an error.
    let windowed = -1
    let headMs = this.headMs
    switch (this.cause) {
      case 'ok': windowed = 0; break
      case 'upstream': windowed = 1; break
      case 'breakwater':
        if (this.outage) { windowed = 1; headMs = -1 } else if (this.fault === 'abort') windowed = this.status >= 500 ? 1 : 0
        break
      // client: neither a request nor an error for the triggers
    }
    if (windowed !== -1) {
      const head = this.head
      // The verifier's own probe (it carries the process's key, which no client can know) is
      // not users' traffic: no trigger window, triage signal or failover record counts it
      // (SPEC §15), so a probe of a dead path fires nothing and healthy probes dilute nothing.
      if (head !== null && isOwnProbe(head, dp.probeKey)) {
        if (route !== null && dp.onSynthetic !== null) dp.onSynthetic(head.synthetic, route.name, windowMsAt(endedAt))
      } else {
        stats.outcome(windowMsAt(endedAt), windowed === 1, headMs)
        // Answered by a failover: its record since traffic went there (triage).
        if (route !== null && this.upstream !== route.upstream && this.upstream !== null) route.upstream.failover?.served(windowed === 1)
      }
    }
    const rate = dp.accessLogRate
    const logged = rate > 0 && (rate >= 1 || Math.random() < rate)
    if (this.spanExport === null && !logged) return
    // The span and the line are made with the others of their batch (tracing.ts, lines.ts
    // `later`): what they read from the client's socket (gone by then) and the clock is read now.
    const peer = this.peer = peerAddress(this)
    const trusted = dp.trustedProxies[this.listener]
    this.clientAddress = peer === undefined || trusted === null ? peer : clientAddress(this.req, trusted) || peer
    if (this.spanExport !== null) this.spanExport.add(this)
    if (logged) {
      this.loggedAt = Date.now()
      this.loggedSeconds = seconds
      dp.lines.later(this)
    }
  }

  /** The access-log line (`LaterLine`), made after `end`. */
  writeLine (): void {
    this.accessLog()
  }

  /**
   * The access-log line: OpenTelemetry's HTTP attribute names for what HTTP says, Breakwater's
   * own names for what the proxy decided (README "Access log"). 5xx lines are warnings. Built as
   * JSON text (one line per request: no object for pino to walk); every string goes through
   * `jsonString`, absent fields are left out, in this order.
   */
  private accessLog (): void {
    const level = isServerError(this) ? 'warn' : 'info'
    const lines = this.dp.lines
    if (!lines.enabled(level)) return
    const route = this.route
    const rawMethod = this.req.method as string
    const method = requestMethod(rawMethod)
    let l = ',"requestId":' + jsonString(this.requestId)
    // Trace and span ids are lower-case hex (made here, or read from a valid traceparent).
    if (this.traceId !== '') l += ',"trace_id":"' + this.traceId + '"'
    if (this.spanId !== '') l += ',"span_id":"' + this.spanId + '"'
    l += LOGGED.method.of(method)
    if (method === '_OTHER') l += ',"http.request.method_original":' + jsonString(rawMethod)
    l += ',"url.path":' + jsonString(pathOnly(this.path)) + ',"http.response.status_code":' + jsonNumber(this.status)
    const template = httpRoute(route)
    if (template !== null) l += LOGGED.template.of(template)
    const server = hostAddress(requestHost(this))
    if (server !== undefined) l += LOGGED.server.of(server)
    const client = this.clientAddress
    if (client !== undefined) l += LOGGED.client.of(client)
    // The proxy in front, when the client is one it forwards for (OpenTelemetry HTTP conventions).
    if (this.peer !== client && this.peer !== undefined) l += ',"network.peer.address":' + jsonString(this.peer)
    const agent = userAgent(this.req.rawHeaders)
    if (agent !== undefined) l += LOGGED.agent.of(agent)
    const error = errorType(this)
    if (error !== undefined) l += LOGGED.error.of(error)
    if (route !== null) l += LOGGED.route.of(route.name)
    if (this.upstream !== null) l += LOGGED.upstream.of(this.upstream.name)
    if (this.endpoint !== null) l += LOGGED.endpoint.of(this.endpoint.origin)
    l += this.cause === null ? ',"outcome":null' : LOGGED.outcome.of(this.cause)
    l += ',"durationMs":' + jsonMillis(Math.round(this.loggedSeconds * 1e6))
    if (this.attempt !== 0) l += ',"attempts":' + jsonNumber(this.attempt)
    if (this.fault !== null) l += ',"fault":' + jsonString(this.fault)
    if (this.fallback !== null) l += ',"fallback":' + jsonString(this.fallback)
    if (this.upgrade) l += ',"upgrade":"websocket"'
    lines.write(level, l, 'request', this.loggedAt)
  }
}

/** The access log's members whose values repeat from request to request, escaped once (lines.ts). */
const LOGGED = {
  method: new JsonMembers('http.request.method'),
  template: new JsonMembers('http.route'),
  server: new JsonMembers('server.address'),
  client: new JsonMembers('client.address'),
  agent: new JsonMembers('user_agent.original'),
  error: new JsonMembers('error.type'),
  route: new JsonMembers('route'),
  upstream: new JsonMembers('upstream'),
  endpoint: new JsonMembers('endpoint'),
  outcome: new JsonMembers('outcome')
}

/** `url.path`: the path without its query. */
export function pathOnly (path: string): string {
  const q = path.indexOf('?')
  return q === -1 ? path : path.slice(0, q)
}
