/**
 * The export half of tracing (SPEC §18): the server spans of sampled requests, queued when the
 * request ends (context.ts `end`) and sent over OTLP/HTTP in batches by OpenTelemetry's
 * transport, off the request path. The sidecar loads this module with `await import()` only
 * when `tracing` is configured (STYLE 18): without it, no OpenTelemetry package is ever loaded.
 *
 * The request path only pushes a finished request onto a bounded queue. A timer (`batch.delayMs`)
 * or a full batch (`batch.maxSize`) starts an export on a later turn of the event loop, one at
 * a time, each bounded by `batch.timeoutMs`. When the collector is slow or down the queue fills
 * and new spans are dropped (`breakwater_trace_spans_dropped_total{reason="queue_full"}`); a
 * batch the exporter gives up on is counted too (`reason="export_failed"`), with one warn line
 * per failing streak. A request never waits for any of it.
 *
 * The data plane makes its own sampling decision and ids (trace.ts) and builds no SDK span,
 * context or attribute machinery per request. A request that ends is kept as it is until 32
 * have ended or its batch is due, and then the spans are written one after another: written
 * between two requests, each span cost more (the paired bench read tracing every request at
 * 1.22x, then 1.14x, on the same run conditions). With `protocol: http/protobuf` (the default) a
 * span is written as bytes into its batch (otlp-protobuf.ts); with `http/json` it is a plain
 * object shaped as the SDK's `ReadableSpan`, serialised by OpenTelemetry's JSON exporter.
 */
import type { Logger } from 'pino'
import type { Attributes, HrTime, Link, SpanContext, SpanStatus } from '@opentelemetry/api'
import type { ReadableSpan, TimedEvent } from '@opentelemetry/sdk-trace'
import type { Resource } from '@opentelemetry/resources'
import type { TracingConfig } from '../config/types.js'
import type { RequestContext } from '../proxy/context.js'
import { isServerError, type SpanExport } from '../proxy/trace.js'
import { decodeExportTraceServiceResponse, hrTime, SpanEncoder, type SpanBatch } from './otlp-protobuf.js'
import { spanName, writeSpanAttributes, type SpanWriter } from './span-facts.js'

type InstrumentationScope = ReadableSpan['instrumentationScope']

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

/** Collects attributes into the object a `ReadableSpan` carries. */
class AttributeObject implements SpanWriter {
  readonly attributes: Attributes = {}
  string (key: string, value: string): void { this.attributes[key] = value }
  int (key: string, value: number): void { this.attributes[key] = value }
}

/** One request's server span, finished, as OpenTelemetry's JSON exporter takes it. */
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

  constructor (ctx: RequestContext, endMs: number, resource: Resource, scope: InstrumentationScope) {
    this.resource = resource
    this.instrumentationScope = scope
    this.context = { traceId: ctx.traceId, spanId: ctx.spanId, traceFlags: SAMPLED }
    this.parentSpanContext = ctx.parentSpanId === '' ? undefined : { traceId: ctx.traceId, spanId: ctx.parentSpanId, traceFlags: SAMPLED, isRemote: true }
    this.startTime = hrTime(performance.timeOrigin + ctx.startedAt)
    this.endTime = hrTime(performance.timeOrigin + endMs)
    this.duration = hrTime(endMs - ctx.startedAt)
    this.status = isServerError(ctx) ? STATUS_ERROR : STATUS_UNSET
    const out = new AttributeObject()
    writeSpanAttributes(ctx, out)
    this.attributes = out.attributes
    this.name = spanName(ctx)
  }

  spanContext (): SpanContext {
    return this.context
  }
}

/** The OTLP exporter of one encoding's batches: OpenTelemetry's `OTLPExporterBase`. */
interface BatchExporter<B> {
  export: (batch: B, done: (result: { code: number, error?: Error }) => void) => void
  shutdown: () => Promise<void>
}

/** How the queue keeps spans until they are sent, and who sends them. */
export interface Encoding<B> {
  /** A new, empty batch. */
  open: () => B
  /** Add the server span of `ctx`, which ended at `endMs` (performance.now()). */
  append: (batch: B, ctx: RequestContext, endMs: number) => void
  count: (batch: B) => number
  /** The batch has been sent or given up on: its memory may be reused. */
  release: (batch: B) => void
  /** `service.version` of the spans appended from now on (a reload changed `version`). */
  setVersion: (version: string) => void
  readonly exporter: BatchExporter<B>
}

/** `http/protobuf`: each span appended as bytes when its request ends (otlp-protobuf.ts). */
export class ProtobufEncoding implements Encoding<SpanBatch> {
  readonly exporter: BatchExporter<SpanBatch>
  private readonly encoder: SpanEncoder
  private readonly batchSize: number
  private spare: SpanBatch | null = null

  constructor (encoder: SpanEncoder, exporter: BatchExporter<SpanBatch>, batchSize: number) {
    this.encoder = encoder
    this.exporter = exporter
    this.batchSize = batchSize
  }

  open (): SpanBatch {
    const spare = this.spare
    this.spare = null
    if (spare !== null && this.encoder.reuse(spare)) return spare
    return this.encoder.open(this.batchSize)
  }

  setVersion (version: string): void {
    this.encoder.setVersion(version)
  }

  append (batch: SpanBatch, ctx: RequestContext, endMs: number): void {
    const encoder = this.encoder
    encoder.begin(batch, ctx.traceId, ctx.spanId, ctx.parentSpanId, spanName(ctx), performance.timeOrigin + ctx.startedAt, performance.timeOrigin + endMs)
    writeSpanAttributes(ctx, encoder)
    encoder.end(isServerError(ctx), ctx.parentSpanId !== '')
  }

  count (batch: SpanBatch): number {
    return batch.count
  }

  release (batch: SpanBatch): void {
    // One buffer kept for the next batch; an outsized one (very long URLs) goes back to the allocator.
    if (batch.buf.length <= SPARE_LIMIT) this.spare = batch
  }
}

/** `http/json`: span objects, serialised by OpenTelemetry's JSON exporter when sent. */
export class JsonEncoding implements Encoding<ServerSpan[]> {
  readonly exporter: BatchExporter<ServerSpan[]>
  private resource: Resource
  private readonly scope: InstrumentationScope

  /** `withVersion`: the resource for another `service.version` (a reload changed it). */
  constructor (exporter: BatchExporter<ServerSpan[]>, resource: Resource, scope: InstrumentationScope, private readonly withVersion: ((version: string) => Resource) | null = null) {
    this.exporter = exporter
    this.resource = resource
    this.scope = scope
  }

  setVersion (version: string): void {
    if (this.withVersion !== null) this.resource = this.withVersion(version)
  }

  open (): ServerSpan[] { return [] }
  append (batch: ServerSpan[], ctx: RequestContext, endMs: number): void { batch.push(new ServerSpan(ctx, endMs, this.resource, this.scope)) }
  count (batch: ServerSpan[]): number { return batch.length }
  release (): void {}
}

/** The largest batch buffer kept for reuse. */
const SPARE_LIMIT = 4 * 1024 * 1024

/**
 * The configured encoding and its exporter, over OpenTelemetry's OTLP/HTTP transport (retries,
 * `Retry-After`, timeouts, headers, partial success); only the packages that encoding needs load.
 */
export async function loadEncoding (config: TracingConfig, version: string): Promise<Encoding<unknown>> {
  const ca = config.tls.caPem
  // `tracing.tls.ca`: the collector's private CA, in place of the system's roots, as the config
  // check read it; keep-alive as OpenTelemetry's default agent has it (an agent given options
  // starts from none).
  const httpAgentOptions = ca === null ? undefined : { keepAlive: true, ca }
  const options = { url: config.otlpEndpoint, headers: { ...config.headers }, timeoutMillis: config.batch.timeoutMs, httpAgentOptions }
  const scope = { name: 'breakwater', version: VERSION }
  if (config.protocol === 'http/json') {
    const [{ OTLPTraceExporter }, { resourceFromAttributes }] = await Promise.all([import('@opentelemetry/exporter-trace-otlp-http'), import('@opentelemetry/resources')])
    const withVersion = (v: string): Resource => resourceFromAttributes(resourceAttributes(config.serviceName, v))
    return new JsonEncoding(new OTLPTraceExporter(options), withVersion(version), scope, withVersion) as Encoding<unknown>
  }
  const [{ OTLPExporterBase }, http] = await Promise.all([
    import('@opentelemetry/otlp-exporter-base'),
    import('@opentelemetry/otlp-exporter-base/node-http')
  ])
  const encoder = new SpanEncoder(resourceAttributes(config.serviceName, version), scope)
  const serializer = {
    serializeRequest: (batch: SpanBatch) => encoder.request(batch),
    deserializeResponse: decodeExportTraceServiceResponse
  }
  const delegate = http.createOtlpHttpExportDelegate(
    http.convertLegacyHttpOptions(options, 'TRACES', 'v1/traces', { 'Content-Type': 'application/x-protobuf' }),
    serializer,
    'otlp_http_span_exporter',
    { name: 'span', countItems: (batch: SpanBatch) => batch.count },
    undefined
  )
  return new ProtobufEncoding(encoder, new OTLPExporterBase(delegate), config.batch.maxSize) as Encoding<unknown>
}

/** The resource of every span: `service.name`, and `service.version`, which follows a reload. */
function resourceAttributes (serviceName: string, version: string): Record<string, string> {
  return { 'service.name': serviceName, 'service.version': version }
}

/** The sidecar's exporter: a bounded queue of batches in front of the encoding's OTLP/HTTP exporter. */
export class SpanQueue implements SpanExport {
  readonly sampleRatio: number
  private readonly config: TracingConfig
  private readonly encoding: Encoding<unknown>
  private readonly stats: TraceStats
  private readonly logger: Logger
  /** Batches waiting, oldest first; only the last one still takes spans. */
  private batches: unknown[] = []
  /** Spans in `batches`. */
  private queued = 0
  /** Requests ended whose spans are not written yet (`append`), and when each ended (performance.now()). */
  private ended: RequestContext[] = []
  private endedAt: number[] = []
  private timer: NodeJS.Timeout | null = null
  private scheduled = false
  /** The batch being exported (its number), or 0. */
  private exporting = 0
  private exports = 0
  private failing = false
  private idle: (() => void) | null = null
  /** The next span opens a batch (the resource changed: one batch, one resource). */
  private fresh = false
  private version: string | null = null

  constructor (config: TracingConfig, encoding: Encoding<unknown>, stats: TraceStats, logger: Logger, version: string | null = null) {
    this.config = config
    this.version = version
    this.sampleRatio = config.sampleRatio
    this.encoding = encoding
    this.stats = stats
    this.logger = logger
  }

  /**
   * Queue the span of `ctx`, which has just ended. Its bytes are written with the spans of the
   * requests around it (`writeEnded`), one after another while the encoder's code and data
   * are in the CPU's caches, rather than between two requests.
   */
  add (ctx: RequestContext): void {
    if (this.queued + this.ended.length >= this.config.maxQueueSize) {
      this.stats.dropped.queue_full++
      return
    }
    this.ended.push(ctx)
    this.endedAt.push(performance.now())
    if (this.ended.length >= WRITE_TOGETHER) this.writeEnded()
    else if (this.exporting === 0 && this.timer === null && !this.scheduled) this.timer = setTimeout(flushQueue, this.config.batch.delayMs, this).unref()
  }

  /**
   * `service.version` of the spans of requests that end from now on: a reload changed the
   * sidecar's `version`, and spans after a deployment must not be told apart from those before
   * it by the old one. What ended before goes out with the version it ended under.
   */
  setVersion (version: string): void {
    if (version === this.version) return
    this.version = version
    this.writeEnded()
    this.encoding.setVersion(version)
    this.fresh = true
  }

  /** Write the spans of the requests ended since the last time into their batches. */
  private writeEnded (): void {
    const ended = this.ended
    const at = this.endedAt
    if (ended.length === 0) return
    this.ended = []
    this.endedAt = []
    const encoding = this.encoding
    const max = this.config.batch.maxSize
    let last = this.batches[this.batches.length - 1]
    for (let i = 0; i < ended.length; i++) {
      if (last === undefined || this.fresh || encoding.count(last) >= max) {
        last = encoding.open()
        this.batches.push(last)
        this.fresh = false
      }
      encoding.append(last, ended[i] as RequestContext, at[i] as number)
    }
    this.queued += ended.length
    if (this.exporting !== 0) return
    if (encoding.count(this.batches[0]) >= max) this.soon()
    else if (this.timer === null) this.timer = setTimeout(flushQueue, this.config.batch.delayMs, this).unref()
  }

  /** Export on the next turn of the event loop, never on the stack of the request that filled the batch. */
  private soon (): void {
    if (this.scheduled) return
    this.scheduled = true
    setImmediate(flushQueue, this)
  }

  /** Send the oldest batch, if none is in flight. */
  flush (): void {
    if (this.exporting === 0) this.writeEnded()
    this.scheduled = false
    if (this.timer !== null) { clearTimeout(this.timer); this.timer = null }
    if (this.exporting !== 0) return
    const batch = this.batches.shift()
    if (batch === undefined) { this.idle?.(); return }
    const count = this.encoding.count(batch)
    this.queued -= count
    const n = ++this.exports
    this.exporting = n
    // The exporter bounds its request (and retries) by timeoutMs; this bounds a callback that never comes.
    const guard = setTimeout(() => { this.settled(n, null, count, new Error(`no answer within ${this.config.batch.timeoutMs} ms`)) }, this.config.batch.timeoutMs + 1000).unref()
    try {
      this.encoding.exporter.export(batch, (result) => {
        clearTimeout(guard)
        this.settled(n, batch, count, result.code === 0 ? null : result.error ?? new Error('export failed'))
      })
    } catch (err) {
      clearTimeout(guard)
      this.settled(n, batch, count, err as Error)
    }
  }

  /** Export `n` is over; `batch` is null when the guard gave up on it (the transport may still hold its bytes). */
  private settled (n: number, batch: unknown, count: number, error: Error | null): void {
    if (this.exporting !== n) return // the guard gave up on it already
    this.exporting = 0
    if (batch !== null) this.encoding.release(batch)
    this.writeEnded()
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
    const first = this.batches[0]
    if (first === undefined) this.idle?.()
    else if (this.encoding.count(first) >= this.config.batch.maxSize || this.idle !== null) this.soon()
    else if (this.timer === null) this.timer = setTimeout(flushQueue, this.config.batch.delayMs, this).unref()
  }

  /** Export what is queued (at shutdown) for up to `limitMs`, then stop the exporter. */
  async close (limitMs: number): Promise<void> {
    let timer: NodeJS.Timeout | undefined
    const limit = new Promise<void>((resolve) => { timer = setTimeout(resolve, Math.min(limitMs, this.config.batch.timeoutMs)).unref() })
    const drained = new Promise<void>((resolve) => {
      this.idle = resolve
      this.flush()
    })
    await Promise.race([limit, drained.then(async () => { await this.encoding.exporter.shutdown() })]).catch(() => {})
    clearTimeout(timer)
    this.idle = null
    this.dropQueued()
  }

  /** Whatever could not be sent by the end counts as dropped. */
  private dropQueued (): void {
    if (this.timer !== null) { clearTimeout(this.timer); this.timer = null }
    this.stats.dropped.export_failed += this.queued + this.ended.length
    this.queued = 0
    this.batches = []
    this.ended = []
    this.endedAt = []
  }
}

/** Spans of ended requests written into their batch together (`SpanQueue.add`). */
const WRITE_TOGETHER = 32

function flushQueue (queue: SpanQueue): void {
  queue.flush()
}
