/**
 * Defaults that more than the schema needs: the schema declares them (`withDefault`) from
 * here, and the CLI's light reader of a config file (`admin-settings.ts`), which finds a
 * sidecar's admin API without the schema, falls back to the same values.
 */

/** `stateDir`, relative to the config file's folder. */
export const DEFAULT_STATE_DIR = './.breakwater'

/** `listen.ops` and `listen.admin`. */
export const DEFAULT_OPS_LISTEN = { host: '0.0.0.0', port: 14020 } as const
export const DEFAULT_ADMIN_LISTEN = { host: '127.0.0.1', port: 14000 } as const

/** The file in `stateDir` that holds a generated admin token. */
export const ADMIN_TOKEN_FILE = 'admin.token'
