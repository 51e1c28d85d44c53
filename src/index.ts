/**
 * Breakwater as a library: `defineConfig` for typed `.mjs`/TypeScript configs, and
 * `startSidecar` for embedding and tests.
 */
import type { ConfigInput } from './config/schema.js'

export type { ConfigInput } from './config/schema.js'
export type { Config } from './config/types.js'
export { resolveConfig, loadConfigFile, ConfigError } from './config/load.js'
export { startSidecar, Sidecar } from './sidecar.js'

/** Identity function that types a config written in code: `export default defineConfig({...})`. */
export function defineConfig (config: ConfigInput): ConfigInput {
  return config
}
