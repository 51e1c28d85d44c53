/**
 * What the ops and the admin listener's fastify instances share. Neither declares a route
 * schema (they check requests in code and answer with JSON.stringify), so neither needs
 * fastify's default schema compilers (ajv and fast-json-stringify), which fastify otherwise
 * loads when the first instance is made: 60–100 ms of every start-up. A route given a schema
 * fails at start, naming this.
 */
import type { FastifyServerOptions } from 'fastify'

function noSchemas (): never {
  throw new Error('the ops and admin listeners compile no route schemas (see ops/fastify-options.ts)')
}

export const WITHOUT_SCHEMAS: Pick<FastifyServerOptions, 'schemaController'> = {
  schemaController: { compilersFactory: { buildValidator: noSchemas, buildSerializer: noSchemas } }
}
