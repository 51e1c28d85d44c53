/**
 * Breakwater's flags as an OpenFeature provider. Everything that reads a flag outside the
 * request path goes through OpenFeature; the request path reads the snapshot that
 * `FlagSnapshot` rebuilds through this provider whenever it announces a change. A flag with
 * flagd targeting is evaluated with the caller's evaluation context.
 */
import {
  OpenFeatureEventEmitter,
  ProviderEvents,
  StandardResolutionReasons,
  ErrorCode,
  type Provider,
  type ResolutionDetails,
  type EvaluationContext,
  type JsonValue
} from '@openfeature/server-sdk'
import type { FlagSources } from './sources.js'

export class BreakwaterProvider implements Provider {
  readonly metadata = { name: 'breakwater' } as const
  readonly runsOn = 'server' as const
  readonly events = new OpenFeatureEventEmitter()

  constructor (readonly sources: FlagSources) {}

  /** Tell OpenFeature (and through it the snapshot) that flags changed. */
  changed (flagsChanged: string[]): void {
    this.events.emit(ProviderEvents.ConfigurationChanged, { flagsChanged })
  }

  async resolveBooleanEvaluation (flagKey: string, defaultValue: boolean, context: EvaluationContext): Promise<ResolutionDetails<boolean>> {
    const r = this.sources.resolve(flagKey)
    if (r === null) return { value: defaultValue, reason: StandardResolutionReasons.ERROR, errorCode: ErrorCode.FLAG_NOT_FOUND, errorMessage: `flag "${flagKey}" is not defined` }
    if (r.targeting !== null) {
      // flagd targeting, with the caller's context: what the request path evaluates per request.
      const d = r.targeting.resolveBooleanEvaluation(flagKey, this.sources.codeDefault(flagKey), context)
      return { ...d, flagMetadata: { ...d.flagMetadata, origin: r.origin } }
    }
    const reason = r.origin === 'default' ? StandardResolutionReasons.DISABLED : r.origin === 'override' ? StandardResolutionReasons.STATIC : StandardResolutionReasons.DEFAULT
    return { value: r.value, reason, variant: r.value ? 'on' : 'off', flagMetadata: { origin: r.origin } }
  }

  async resolveStringEvaluation (flagKey: string, defaultValue: string): Promise<ResolutionDetails<string>> {
    return this.typeMismatch(flagKey, defaultValue)
  }

  async resolveNumberEvaluation (flagKey: string, defaultValue: number): Promise<ResolutionDetails<number>> {
    return this.typeMismatch(flagKey, defaultValue)
  }

  async resolveObjectEvaluation<T extends JsonValue> (flagKey: string, defaultValue: T): Promise<ResolutionDetails<T>> {
    return this.typeMismatch(flagKey, defaultValue)
  }

  private typeMismatch<T> (flagKey: string, defaultValue: T): ResolutionDetails<T> {
    return { value: defaultValue, reason: StandardResolutionReasons.ERROR, errorCode: ErrorCode.TYPE_MISMATCH, errorMessage: `flag "${flagKey}" is a boolean` }
  }
}
