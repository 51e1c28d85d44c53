/**
 * The export half of tracing (SPEC §18): the server spans of sampled requests, queued when the
 * request ends (context.ts `end`) and sent over OTLP/HTTP in batches by OpenTelemetry's exporter
 * (binary protobuf by default, JSON with `protocol: http/json`), off the request path. The sidecar loads this module with `await import()` only when
 * `tracing` is configured (STYLE 18): without it, no OpenTelemetry package is ever loaded.
 *
 * The request path only pushes a finished span onto a bounded queue. A timer (`batch.delayMs`)
 * or a full batch (`batch.maxSize`) starts an export on a later turn of the event loop, one at
 * a time, each bounded by `batch.timeoutMs`. When the collector is slow or down the queue fills
 * and new spans are dropped (`breakwater_trace_spans_dropped_total{reason="queue_full"}`); a
 * batch the exporter gives up on is counted too (`reason="export_failed"`), with one warn line
 * per failing streak. A request never waits for any of it.
 *
 * Spans are plain objects shaped as the SDK's `ReadableSpan` (what the exporter serialises):
 * the data plane makes its own sampling decision and ids (trace.ts) and builds no SDK span,
 * context or attribute machinery per request.
 */
import type { Logger } from 'pino'
import type { Attributes, HrTime, Link, SpanContext, SpanStatus } from '@opentelemetry/api'
import type { ReadableSpan, TimedEvent } from '@opentelemetry/sdk-trace'

type InstrumentationScope = ReadableSpan['instrumentationScope']
import { resourceFromAttributes, type Resource } from '@opentelemetry/resources'
import type { SpanExporter } from '@opentelemetry/sdk-trace'
import type { TracingConfig } from '../config/types.js'
import { CLIENT_CLOSED, pathOnly, type RequestContext } from '../proxy/context.js'
import { httpRoute, errorType, isServerError, hostAddress, hostPort, requestHost, clientAddress, userAgent, requestMethod, type SpanExport } from '../proxy/trace.js'

/** Counters read by `/metrics`. */
export interface TraceStats {
  /** Spans handed to the collector. */
  exported: number
  /** Spans lost: the queue was full, or the exporter gave up on their batch. */
  dropped: { queue_full: number, export_failed: number }
}

/** `SpanKind.SERVER` and `SpanStatusCode` of @opentelemetry/api (no runtime import needed for three numbers). */
const KIND_SERVER = 1
const STATUS_UNSET: SpanStatus = Object.freeze({ code: 0 })
const STATUS_ERROR: SpanStatus = Object.freeze({ code: 2 })
const NONE: never[] = []
const SAMPLED = 1
const VERSION = '0.1.0'

/** Epoch milliseconds (fractional) as OpenTelemetry's [seconds, nanoseconds]. */
function hrTime (ms: number): HrTime {
  let seconds = Math.floor(ms / 1000)
  let nanos = Math.round((ms - seconds * 1000) * 1e6)
  if (nanos >= 1e9) { seconds++; nanos -= 1e9 }
  return [seconds, nanos]
}

/** One request's server span, finished. */
class ServerSpan implements ReadableSpan {
  readonly name: string
  readonly kind = KIND_SERVER
  readonly parentSpanContext: SpanContext | undefined
  readonly startTime: HrTime
  readonly endTime: HrTime
  readonly duration: HrTime
  readonly status: SpanStatus
  readonly attributes: Attributes
  readonly links: Link[] = NONE
  readonly events: TimedEvent[] = NONE
  readonly ended = true
  readonly resource: Resource
  readonly instrumentationScope: InstrumentationScope
  readonly droppedAttributesCount = 0
  readonly droppedEventsCount = 0
  readonly droppedLinksCount = 0
  private readonly context: SpanContext

  constructor (ctx: RequestContext, resource: Resource, scope: InstrumentationScope) {
    const endMs = performance.now()
    this.resource = resource
    this.instrumentationScope = scope
    this.context = { traceId: ctx.traceId, spanId: ctx.spanId, traceFlags: SAMPLED }
    this.parentSpanContext = ctx.parentSpanId === '' ? undefined : { traceId: ctx.traceId, spanId: ctx.parentSpanId, traceFlags: SAMPLED, isRemote: true }
    this.startTime = hrTime(performance.timeOrigin + ctx.startedAt)
    this.endTime = hrTime(performance.timeOrigin + endMs)
    this.duration = hrTime(endMs - ctx.startedAt)
    this.status = isServerError(ctx) ? STATUS_ERROR : STATUS_UNSET

    // OpenTelemetry HTTP semantic conventions, server span.
    const route = ctx.route
    const method = requestMethod(ctx.req.method as string)
    const template = httpRoute(route)
    const host = requestHost(ctx)
    const scheme = (ctx.clientSocket as { encrypted?: boolean }).encrypted === true ? 'https' : 'http'
    const attributes: Attributes = {
      'http.request.method': method,
      'url.path': pathOnly(ctx.path),
      'url.scheme': scheme,
      'network.protocol.version': ctx.req.httpVersion,
      'breakwater.outcome': ctx.cause ?? 'client'
    }
    const address = hostAddress(host)
    if (address !== undefined) {
      attributes['server.address'] = address
      attributes['server.port'] = hostPort(host, scheme)
    }
    if (method === '_OTHER') attributes['http.request.method_original'] = ctx.req.method
    // A client that left before any response got no status code.
    if (ctx.status !== CLIENT_CLOSED) attributes['http.response.status_code'] = ctx.status
    if (template !== null) attributes['http.route'] = template
    const client = clientAddress(ctx)
    if (client !== undefined) attributes['client.address'] = client
    const agent = userAgent(ctx.req.rawHeaders)
    if (agent !== undefined) attributes['user_agent.original'] = agent
    const error = errorType(ctx)
    if (error !== undefined) attributes['error.type'] = error
    if (route !== null) {
      attributes['breakwater.route'] = route.name
      attributes['breakwater.upstream'] = route.upstream.name
    }
    this.attributes = attributes
    // `{method} {target}`: the route's template, else its name; `HTTP` for a method OpenTelemetry does not know.
    const verb = method === '_OTHER' ? 'HTTP' : method
    const target = template ?? route?.name
    this.name = target === undefined ? verb : `${verb} ${target}`
  }

  spanContext (): SpanContext {
    return this.context
  }
}

/**
 * OpenTelemetry's OTLP/HTTP exporter for the configured encoding; only that one package loads.
 * Protobuf is the default: its serialiser writes the wire format straight from the spans, at
 * about half the CPU and bytes of JSON (bench/README.md).
 */
export async function loadExporter (config: TracingConfig): Promise<SpanExporter> {
  const options = { url: config.otlpEndpoint, headers: { ...config.headers }, timeoutMillis: config.batch.timeoutMs }
  if (config.protocol === 'http/json') {
    const { OTLPTraceExporter } = await import('@opentelemetry/exporter-trace-otlp-http')
    return new OTLPTraceExporter(options)
  }
  const { OTLPTraceExporter } = await import('@opentelemetry/exporter-trace-otlp-proto')
  return new OTLPTraceExporter(options)
}

/** The sidecar's exporter: a bounded queue in front of OpenTelemetry's OTLP/HTTP exporter. */
export class SpanQueue implements SpanExport {
  readonly sampleRatio: number
  private readonly config: TracingConfig
  private readonly exporter: SpanExporter
  private readonly resource: Resource
  private readonly scope: InstrumentationScope = { name: 'breakwater', version: VERSION }
  private readonly stats: TraceStats
  private readonly logger: Logger
  private spans: ServerSpan[] = []
  private timer: NodeJS.Timeout | null = null
  private scheduled = false
  /** The batch being exported (its number), or 0. */
  private exporting = 0
  private batches = 0
  private failing = false
  private idle: (() => void) | null = null

  constructor (config: TracingConfig, exporter: SpanExporter, version: string, stats: TraceStats, logger: Logger) {
    this.config = config
    this.sampleRatio = config.sampleRatio
    this.stats = stats
    this.logger = logger
    this.resource = resourceFromAttributes({ 'service.name': config.serviceName, 'service.version': version })
    this.exporter = exporter
  }

  add (ctx: RequestContext): void {
    if (this.spans.length >= this.config.maxQueueSize) {
      this.stats.dropped.queue_full++
      return
    }
    this.spans.push(new ServerSpan(ctx, this.resource, this.scope))
    if (this.exporting !== 0) return
    if (this.spans.length >= this.config.batch.maxSize) this.soon()
    else if (this.timer === null) this.timer = setTimeout(flushQueue, this.config.batch.delayMs, this).unref()
  }

  /** Export on the next turn of the event loop, never on the stack of the request that filled the batch. */
  private soon (): void {
    if (this.scheduled) return
    this.scheduled = true
    setImmediate(flushQueue, this)
  }

  /** Send the next batch, if none is in flight. */
  flush (): void {
    this.scheduled = false
    if (this.timer !== null) { clearTimeout(this.timer); this.timer = null }
    if (this.exporting !== 0 || this.spans.length === 0) { if (this.exporting === 0) this.idle?.(); return }
    const max = this.config.batch.maxSize
    let batch: ServerSpan[]
    if (this.spans.length <= max) {
      batch = this.spans
      this.spans = []
    } else {
      batch = this.spans.splice(0, max)
    }
    const n = ++this.batches
    this.exporting = n
    // The exporter bounds its request (and retries) by timeoutMs; this bounds a callback that never comes.
    const guard = setTimeout(() => { this.settled(n, batch.length, new Error(`no answer within ${this.config.batch.timeoutMs} ms`)) }, this.config.batch.timeoutMs + 1000).unref()
    try {
      this.exporter.export(batch, (result) => {
        clearTimeout(guard)
        this.settled(n, batch.length, result.code === 0 ? null : result.error ?? new Error('export failed'))
      })
    } catch (err) {
      clearTimeout(guard)
      this.settled(n, batch.length, err as Error)
    }
  }

  private settled (n: number, count: number, error: Error | null): void {
    if (this.exporting !== n) return // the guard gave up on it already
    this.exporting = 0
    if (error === null) {
      this.stats.exported += count
      if (this.failing) {
        this.failing = false
        this.logger.info({ event: 'tracing_export', result: 'ok' }, 'span export recovered')
      }
    } else {
      this.stats.dropped.export_failed += count
      if (!this.failing) {
        this.failing = true
        this.logger.warn({ event: 'tracing_export', result: 'failed', endpoint: this.config.otlpEndpoint, err: error.message }, 'span export failing; spans are dropped until it recovers')
      }
    }
    if (this.spans.length >= this.config.batch.maxSize || (this.idle !== null && this.spans.length > 0)) this.soon()
    else if (this.spans.length > 0 && this.timer === null) this.timer = setTimeout(flushQueue, this.config.batch.delayMs, this).unref()
    else if (this.spans.length === 0) this.idle?.()
  }

  /** Export what is queued (at shutdown) for up to `limitMs`, then stop the exporter. */
  async close (limitMs: number): Promise<void> {
    let timer: NodeJS.Timeout | undefined
    const limit = new Promise<void>((resolve) => { timer = setTimeout(resolve, Math.min(limitMs, this.config.batch.timeoutMs)).unref() })
    const drained = new Promise<void>((resolve) => {
      this.idle = resolve
      this.flush()
    })
    await Promise.race([limit, drained.then(async () => { await this.exporter.shutdown() })]).catch(() => {})
    clearTimeout(timer)
    this.idle = null
    this.dropQueued()
  }

  /** Whatever could not be sent by the end counts as dropped. */
  private dropQueued (): void {
    if (this.timer !== null) { clearTimeout(this.timer); this.timer = null }
    this.stats.dropped.export_failed += this.spans.length
    this.spans = []
  }
}

function flushQueue (queue: SpanQueue): void {
  queue.flush()
}
