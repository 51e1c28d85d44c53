/**
 * The config checks that need optional code loaded — flagd-core for a flag file with
 * targeting, the provider's module for `flagProvider` — so `resolveConfig` stays synchronous
 * and a config without them loads nothing. Run by `validate`, at start and at every reload.
 */
import type { Logger as FeatureLogger } from '@openfeature/server-sdk'
import type { Config } from '../config/types.js'
import { loadConfigFile, ConfigError, type Loaded } from '../config/load.js'
import { readFlagFileSync } from './flagd-file.js'
import { compileTargeting, uncompilable } from './targeting.js'
import { loadProviderClass } from './provider-source.js'

const quiet: FeatureLogger = { error () {}, warn () {}, info () {}, debug () {} }

/** One line per problem, each naming its config key. */
export async function checkFlagServices (config: Config): Promise<string[]> {
  const problems: string[] = []
  const source = config.flagSource
  if (source !== null) {
    const read = readFlagFileSync(source.path)
    if (read.kind === 'ok' && read.flags.targeted.size > 0) {
      try {
        const core = await compileTargeting(read.flags.text, quiet)
        for (const key of uncompilable(core, read.flags.targeted)) {
          problems.push(`flagSource.path: ${source.path}: flag "${key}": flagd cannot compile its targeting (an unknown operator or malformed JsonLogic)`)
        }
      } catch (err) {
        const cause = (err as Error & { cause?: Error }).cause?.message
        problems.push(`flagSource.path: ${source.path} is not a valid flag file: flagd refuses it (${(err as Error).message}${cause === undefined ? '' : `: ${cause}`})`)
      }
    }
  }
  if (config.flagProvider !== null) {
    try {
      await loadProviderClass(config.flagProvider)
    } catch (err) {
      problems.push((err as Error).message)
    }
  }
  return problems
}

/** `loadConfigFile`, then the checks that need optional code: what `validate`, start and reload use. */
export async function loadCheckedConfig (path: string, env?: NodeJS.ProcessEnv): Promise<Loaded> {
  const loaded = await loadConfigFile(path, env)
  const problems = await checkFlagServices(loaded.config)
  if (problems.length > 0) throw new ConfigError(problems)
  return loaded
}
