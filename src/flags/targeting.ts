/**
 * flagd targeting, per request, evaluated by flagd itself: `@openfeature/flagd-core` (the
 * evaluator inside flagd's in-process providers) runs the rule — `targeting`, `$evaluators` /
 * `$ref`, `fractional`, `if`, `in`, `starts_with`, `ends_with`, `sem_ver`, `$flagd.*` — so a
 * kill switch is on or off for exactly the requests flagd says. Breakwater has no JsonLogic
 * engine of its own.
 *
 * Only flags with a targeting rule come here; every other flag stays one `Map.get` on the
 * snapshot (STYLE 5). flagd-core is loaded with `await import()` the first time a flag file
 * (or provider) has such a flag, so a sidecar without targeting never loads it.
 *
 * The evaluation is synchronous (flagd-core compiles each rule once, when the flags are set)
 * and is not cached: a rule may read `$flagd.timestamp`, the path or the method, so caching by
 * targeting key would change what flagd decides.
 */
import type { EvaluationContext, Logger as FeatureLogger, ResolutionDetails } from '@openfeature/server-sdk'
import type { Logger } from 'pino'
import type { RequestHead } from '../proxy/headers.js'
import { requestHostKey, hostName } from '../proxy/route-table.js'

/** The synchronous evaluator Breakwater calls: a flagd-core `FlagdCore`. */
export interface FlagdEvaluator {
  resolveBooleanEvaluation: (flagKey: string, defaultValue: boolean, context?: EvaluationContext, logger?: FeatureLogger) => ResolutionDetails<boolean>
}

/**
 * Load flagd-core and give it a flagd flag file's text, as flagd's in-process provider does.
 * Throws when flagd-core refuses the text.
 */
export async function compileTargeting (text: string, logger: FeatureLogger): Promise<FlagdEvaluator> {
  const { FlagdCore } = await import('@openfeature/flagd-core')
  const core = new FlagdCore(undefined, logger)
  core.setConfigurations(text)
  return core
}

/**
 * The flags among `keys` whose rule flagd-core could not compile (an unknown operator,
 * malformed JsonLogic). flagd keeps such a flag and serves it the code default.
 */
export function uncompilable (core: FlagdEvaluator, keys: Iterable<string>): string[] {
  const out: string[] = []
  for (const key of keys) if (core.resolveBooleanEvaluation(key, true, {}).errorCode === 'PARSE_ERROR') out.push(key)
  return out
}

/** A kill-switch flag whose value depends on the request. Built with each snapshot; `enabledFor` runs per request. */
export class TargetedFlag {
  constructor (
    readonly key: string,
    private readonly evaluator: FlagdEvaluator,
    /** What flagd falls back to (DISABLED, no default variant, a rule error): `featureFlags`, else on. */
    private readonly codeDefault: boolean,
    /** `flags.targetingKeyHeader`, lower case. */
    private readonly keyHeader: string,
    private readonly logger: FeatureLogger
  ) {}

  /**
   * Whether the flag is on for this request. The context a rule sees (SPEC §16): `targetingKey`
   * (absent without the header, as flagd sees a request without one), `path` — the path the
   * route matched on (see kill-switch.ts), so a rule cannot be dodged by spelling — `method`, and
   * `host` (the Host as routes read it: lower case, no final dot, with its port when the client
   * sent one) and `hostname` (the same without the port), so a rule on the host cannot be dodged
   * by `pay.local.` or `pay.local:80` either.
   */
  enabledFor (method: string, path: string, head: RequestHead): boolean {
    const key = targetingKey(head, this.keyHeader)
    const host = requestHostKey(head)
    const hostname = hostName(host)
    const context: EvaluationContext = key === undefined ? { path, method, host, hostname } : { targetingKey: key, path, method, host, hostname }
    return this.evaluator.resolveBooleanEvaluation(this.key, this.codeDefault, context, this.logger).value
  }
}

/**
 * The request's targeting key: the value of the configured header. With the default,
 * `x-request-id`, it is the request id Breakwater kept or created — as Envoy keys its runtime
 * fractions — so a `fractional` rule splits requests; name a user or tenant header to split users.
 */
function targetingKey (head: RequestHead, name: string): string | undefined {
  if (name === 'x-request-id') return head.requestId
  const headers = head.headers
  for (let i = 0; i < headers.length; i += 2) {
    const n = headers[i] as string
    if (n.length === name.length && n.toLowerCase() === name) return headers[i + 1]
  }
  return undefined
}

/**
 * An OpenFeature logger writing into Breakwater's pino log (every stdout line stays JSON);
 * flagd-core logs rule errors at debug, once per evaluation, so debug is checked first.
 */
export function featureLogger (logger: Logger): FeatureLogger {
  const line = (args: unknown[]): string => args.map((a) => a instanceof Error ? a.message : typeof a === 'string' ? a : JSON.stringify(a)).join(' ')
  return {
    error: (...args: unknown[]) => { logger.error({ event: 'flag_source' }, line(args)) },
    warn: (...args: unknown[]) => { logger.warn({ event: 'flag_source' }, line(args)) },
    info: (...args: unknown[]) => { logger.info({ event: 'flag_source' }, line(args)) },
    debug: (...args: unknown[]) => { if (logger.isLevelEnabled('debug')) logger.debug({ event: 'flag_source' }, line(args)) }
  }
}
