/**
 * What an operator command needs from a config file, read without the config compiler: the
 * admin listener (`listen.admin`), `admin.tokenFile` and `stateDir`, with `${ENV}` expanded,
 * relative paths resolved against the config file's folder, and the schema's defaults
 * (`defaults.ts`) — the values the loader resolves for the same file. The rest of the file is
 * not looked at: a command can reach a sidecar whose config has a problem elsewhere (the
 * sidecar runs on the config it last loaded). Loading the schema and its validator would be
 * most of a command's start-up.
 */
import { dirname, join, resolve as resolvePath } from 'node:path'
import { ADMIN_TOKEN_FILE, DEFAULT_ADMIN_LISTEN, DEFAULT_STATE_DIR } from './defaults.js'
import { expandEnv } from './env.js'
import { ConfigError, readConfigSource } from './read.js'

export interface AdminSettings {
  admin: { host: string, port: number }
  /** `admin.tokenFile`, absolute; null when not set. */
  tokenFile: string | null
  /** `stateDir`, absolute. */
  stateDir: string
  /** Where a generated token is: `STATEDIR/admin.token`. */
  generatedTokenFile: string
}

/** Read the admin settings of the config file at `path`. Throws `ConfigError` for a key it needs that is wrong. */
export async function readAdminSettings (path: string, env: NodeJS.ProcessEnv = process.env): Promise<AdminSettings> {
  const source = resolvePath(path)
  const raw = await readConfigSource(source)
  if (!isMapping(raw)) throw new ConfigError(['(root): the configuration must be an object (a YAML/JSON mapping)'])
  const problems: string[] = []
  const pick = (at: string, value: unknown): unknown => expandEnv(value, env, problems, at)
  const listen = isMapping(raw.listen) ? raw.listen : {}
  const admin = isMapping(listen.admin) ? listen.admin : {}
  const host = pick('listen.admin.host', admin.host ?? DEFAULT_ADMIN_LISTEN.host)
  const port = portNumber(pick('listen.admin.port', admin.port ?? DEFAULT_ADMIN_LISTEN.port))
  const stateDir = pick('stateDir', raw.stateDir ?? DEFAULT_STATE_DIR)
  const tokenFile = pick('admin.tokenFile', isMapping(raw.admin) ? raw.admin.tokenFile : undefined)
  if (typeof host !== 'string' || host === '') problems.push('listen.admin.host: must be a string')
  if (port === null) problems.push('listen.admin.port: must be an integer from 0 to 65535')
  if (typeof stateDir !== 'string' || stateDir === '') problems.push('stateDir: must be a string')
  if (tokenFile !== undefined && (typeof tokenFile !== 'string' || tokenFile === '')) problems.push('admin.tokenFile: must be a string')
  if (problems.length > 0) throw new ConfigError(problems)
  const baseDir = dirname(source)
  const state = resolvePath(baseDir, stateDir as string)
  return {
    admin: { host: host as string, port: port as number },
    tokenFile: typeof tokenFile === 'string' ? resolvePath(baseDir, tokenFile) : null,
    stateDir: state,
    generatedTokenFile: join(state, ADMIN_TOKEN_FILE)
  }
}

function isMapping (value: unknown): value is Record<string, unknown> {
  return value !== null && typeof value === 'object' && !Array.isArray(value)
}

/**
 * A port as the loader takes it: an integer, or a numeric string (`${ADMIN_PORT:-14000}`), which
 * the schema's conversion turns into an integer with `parseInt`.
 */
function portNumber (value: unknown): number | null {
  const n = typeof value === 'string' && !isNaN(Number(value)) && !isNaN(parseFloat(value)) ? parseInt(value) : value
  return typeof n === 'number' && Number.isInteger(n) && n >= 0 && n <= 65535 ? n : null
}
