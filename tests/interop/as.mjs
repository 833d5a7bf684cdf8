// An independent DPoP authorization server for the interoperability tests: panva's oidc-provider
// (npm), configured for the client_credentials grant with DPoP-bound JWT access tokens (RFC 9449
// §5, RFC 9068) on 127.0.0.1.
//
// Configuration (environment; the arguments `--port N`, `--require-nonce off|required` and
// `--ttl S` override it):
//   AS_PORT               port to listen on (0, the default, picks a free one)
//   AS_REQUIRE_NONCE      off | required: demand a DPoP nonce on every token request (RFC 9449 §8)
//   AS_TTL                access token lifetime in seconds (default 300)
//   AS_DEFAULT_RESOURCE   resource indicator used when a token request names none
//   AS_CLIENT_JWKS        JSON JWK or JWKS: public key(s) of the static private_key_jwt client
//   AS_CLIENT_JWKS_FILE   the same, read from a file
//
// Static clients (all with dpop_bound_access_tokens, so a token request without a proof fails):
//   basic-client / basic-secret   client_secret_basic
//   post-client / post-secret     client_secret_post
//   pkjwt-client                  private_key_jwt (only when AS_CLIENT_JWKS[_FILE] is given)
// More clients can be registered at run time through dynamic registration (RFC 7591, POST /reg).
//
// DPoP proofs are accepted in ES256, ES384, ES512, EdDSA, PS256 and RS256 (enabledJWA below).
//
// Resource indicators (RFC 8707): any http://127.0.0.1:PORT/ or http://localhost:PORT/ resource
// gets an ES256 JWT access token whose `aud` is that resource, with `cnf.jkt` (RFC 9449 §6.1).
// A token request without `resource` gets the default resource when one is set, otherwise an
// opaque (still DPoP-bound) token the jose resource server cannot verify.
//
// Test hooks outside oidc-provider (served by the wrapping node:http server, never by the AS):
//   GET  /_interop/requests?since=N   every token endpoint request: DPoP header, status, error
//   GET  /_interop/config             current switches
//   POST /_interop/config             {"require_nonce": bool, "ttl": seconds,
//                                      "default_resource": "http://127.0.0.1:PORT/" | null}
// INTEROP_EXIT_ON_STDIN_EOF=1: also exit when stdin reaches end of file (the parent died).
// Prints one JSON line {"ready": true, "issuer", "port"} on stdout when listening; exits on
// SIGTERM or SIGINT.

import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import * as http from 'node:http';
import { parseArgs } from 'node:util';

import { exportJWK, generateKeyPair } from 'jose';
import Provider from 'oidc-provider';
import { stopOnSignals } from './lifecycle.mjs';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string' },
    'require-nonce': { type: 'string' },
    ttl: { type: 'string' },
  },
});

function fail(message) {
  process.stderr.write(`as.mjs: ${message}\n`);
  process.exit(2);
}

function parseNonceMode(value) {
  if (value === undefined || value === '' || value === 'off') return false;
  if (value === 'required') return true;
  return fail(`require-nonce must be "off" or "required", not ${JSON.stringify(value)}`);
}

function parseTtl(value) {
  if (value === undefined || value === '') return 300;
  const ttl = Number(value);
  if (!Number.isInteger(ttl) || ttl < 1) fail(`ttl must be a positive integer number of seconds, not ${value}`);
  return ttl;
}

function loadClientJwks() {
  let text = process.env.AS_CLIENT_JWKS;
  if (!text && process.env.AS_CLIENT_JWKS_FILE) {
    text = readFileSync(process.env.AS_CLIENT_JWKS_FILE, 'utf8');
  }
  if (!text) return undefined;
  const parsed = JSON.parse(text);
  return Array.isArray(parsed.keys) ? parsed : { keys: [parsed] };
}

// Live switches: requireNonce and ttl.ClientCredentials are functions, so the tests can change
// them on a running server instead of paying for a restart.
const state = {
  requireNonce: parseNonceMode(args['require-nonce'] ?? process.env.AS_REQUIRE_NONCE),
  ttl: parseTtl(args.ttl ?? process.env.AS_TTL),
  defaultResource: process.env.AS_DEFAULT_RESOURCE || null,
};
const port = Number(args.port ?? process.env.AS_PORT ?? 0);
if (!Number.isInteger(port) || port < 0 || port > 65535) fail(`bad port ${args.port ?? process.env.AS_PORT}`);

const LOOPBACK_RESOURCE = /^http:\/\/(127\.0\.0\.1|localhost):\d{1,5}\/$/;
const SCOPES = ['api:read', 'api:write'];

async function main() {
  // Fresh signing keys per run: the resource server fetches them from /jwks, nothing is cached.
  const { privateKey: es256 } = await generateKeyPair('ES256', { extractable: true });
  const { privateKey: rs256 } = await generateKeyPair('RS256', { extractable: true });
  const jwks = {
    keys: [
      { ...(await exportJWK(es256)), alg: 'ES256', use: 'sig', kid: 'as-es256' },
      { ...(await exportJWK(rs256)), alg: 'RS256', use: 'sig', kid: 'as-rs256' },
    ],
  };

  const common = {
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    scope: SCOPES.join(' '),
    dpop_bound_access_tokens: true,
  };
  const clients = [
    { ...common, client_id: 'basic-client', client_secret: 'basic-secret', token_endpoint_auth_method: 'client_secret_basic' },
    { ...common, client_id: 'post-client', client_secret: 'post-secret', token_endpoint_auth_method: 'client_secret_post' },
  ];
  const clientJwks = loadClientJwks();
  if (clientJwks) {
    clients.push({
      ...common, client_id: 'pkjwt-client', token_endpoint_auth_method: 'private_key_jwt', jwks: clientJwks,
    });
  }

  let issuer = `http://127.0.0.1:${port}`;
  const server = http.createServer();
  if (port === 0) {
    // The issuer must be known before the Provider is built: reserve the port first.
    await new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', resolve);
    });
    issuer = `http://127.0.0.1:${server.address().port}`;
  }

  const provider = new Provider(issuer, {
    clients,
    jwks,
    scopes: SCOPES,
    cookies: { keys: [randomBytes(32).toString('base64url')] },
    clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'private_key_jwt', 'none'],
    // Every algorithm dpop-signer can sign DPoP proofs with (oidc-provider's default is ES256 and
    // EdDSA only): ES384/ES512 (RFC 7518 §3.4), EdDSA (RFC 8037), PS256 and RS256 (RFC 7518 §3.3,
    // §3.5). They are advertised in dpop_signing_alg_values_supported.
    enabledJWA: {
      dPoPSigningAlgValues: ['ES256', 'ES384', 'ES512', 'EdDSA', 'PS256', 'RS256'],
    },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      registration: { enabled: true },
      dPoP: {
        enabled: true,
        nonceSecret: randomBytes(32),
        requireNonce: () => state.requireNonce,
      },
      resourceIndicators: {
        enabled: true,
        defaultResource: (ctx, client, oneOf) => oneOf ?? state.defaultResource ?? undefined,
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, resourceIndicator) => {
          if (!LOOPBACK_RESOURCE.test(resourceIndicator)) {
            throw new Provider.errors.InvalidTarget('this test server only serves http://127.0.0.1:PORT/ resources');
          }
          return {
            scope: SCOPES.join(' '),
            audience: resourceIndicator,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'ES256' } },
          };
        },
      },
    },
    ttl: {
      ClientCredentials: () => state.ttl,
    },
  });

  // oidc-provider logs server errors through this event only; keep them visible on stderr.
  provider.on('server_error', (ctx, err) => process.stderr.write(`as.mjs: server_error ${err.stack}\n`));

  const requests = [];
  const tokenPath = new URL(provider.urlFor('token')).pathname;
  const callback = provider.callback();

  function sendJson(res, status, body) {
    res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' });
    res.end(JSON.stringify(body));
  }

  function readBody(req) {
    return new Promise((resolve, reject) => {
      const chunks = [];
      req.on('data', (c) => chunks.push(c));
      req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
      req.on('error', reject);
    });
  }

  async function control(req, res, url) {
    if (url.pathname === '/_interop/requests' && req.method === 'GET') {
      const since = Number(url.searchParams.get('since') ?? 0);
      return sendJson(res, 200, { count: requests.length, requests: requests.slice(since) });
    }
    if (url.pathname === '/_interop/config') {
      if (req.method === 'POST') {
        let update;
        try {
          update = JSON.parse(await readBody(req));
        } catch {
          return sendJson(res, 400, { error: 'body must be JSON' });
        }
        if ('require_nonce' in update) {
          if (typeof update.require_nonce !== 'boolean') return sendJson(res, 400, { error: 'require_nonce must be a boolean' });
          state.requireNonce = update.require_nonce;
        }
        if ('ttl' in update) {
          if (!Number.isInteger(update.ttl) || update.ttl < 1) return sendJson(res, 400, { error: 'ttl must be a positive integer' });
          state.ttl = update.ttl;
        }
        if ('default_resource' in update) {
          const value = update.default_resource;
          if (value !== null && !(typeof value === 'string' && LOOPBACK_RESOURCE.test(value))) {
            return sendJson(res, 400, { error: 'default_resource must be null or http://127.0.0.1:PORT/' });
          }
          state.defaultResource = value;
        }
      }
      return sendJson(res, 200, {
        require_nonce: state.requireNonce, ttl: state.ttl, default_resource: state.defaultResource,
      });
    }
    return sendJson(res, 404, { error: 'unknown test hook' });
  }

  server.on('request', (req, res) => {
    const url = new URL(req.url, issuer);
    if (url.pathname.startsWith('/_interop/')) {
      control(req, res, url).catch((err) => sendJson(res, 500, { error: String(err) }));
      return;
    }
    if (url.pathname === tokenPath) {
      // Record what the client sent and what the AS answered, so the tests can re-check every
      // proof with their own verifier and count requests exactly.
      const entry = {
        seq: requests.length,
        method: req.method,
        url: `${issuer}${url.pathname}${url.search}`,
        dpop: req.headers.dpop ?? null,
        status: null,
        error: null,
        dpop_nonce: null,
        time: Date.now() / 1000,
      };
      requests.push(entry);
      const chunks = [];
      const { write, end } = res;
      res.write = function patchedWrite(chunk, ...rest) {
        if (chunk) chunks.push(Buffer.from(chunk));
        return write.call(this, chunk, ...rest);
      };
      res.end = function patchedEnd(chunk, ...rest) {
        if (chunk && typeof chunk !== 'function') chunks.push(Buffer.from(chunk));
        entry.status = res.statusCode;
        entry.dpop_nonce = res.getHeader('dpop-nonce') ?? null;
        try {
          entry.error = JSON.parse(Buffer.concat(chunks).toString('utf8')).error ?? null;
        } catch {
          entry.error = null;
        }
        return end.call(this, chunk, ...rest);
      };
    }
    callback(req, res);
  });

  if (!server.listening) {
    await new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, '127.0.0.1', resolve);
    });
  }
  stopOnSignals(server);
  const actualPort = server.address().port;
  process.stdout.write(`${JSON.stringify({ ready: true, issuer, port: actualPort, token_endpoint: provider.urlFor('token') })}\n`);
}

main().catch((err) => {
  process.stderr.write(`as.mjs: ${err.stack ?? err}\n`);
  process.exit(1);
});
