// order-saga operator console: keeps the server-rendered page current by
// polling the console's JSON endpoints. Data only ever reaches the page as
// text (textContent, setAttribute with values we build): never as markup.
'use strict';

(function () {
  const POLL_MS = 1500;
  const OVERVIEW_POLL_MS = 2000;
  const body = document.body;

  // encodeURIComponent plus the characters it leaves alone but RFC 3986
  // reserves: the same encoding as the server's links.
  function enc(s) {
    return encodeURIComponent(s).replace(/[!'()*]/g, (c) => '%' + c.charCodeAt(0).toString(16).toUpperCase());
  }

  function cellText(key, v) {
    if (v === null || v === undefined) return '';
    if (typeof v === 'string') return v;
    if (typeof v === 'boolean') return key === 'parked' ? (v ? 'parked' : '') : (v ? 'yes' : 'no');
    return String(v);
  }

  function classText(v) {
    if (v === null || v === undefined) return '';
    return String(v);
  }

  function setText(id, text) {
    const el = document.getElementById(id);
    if (el && el.textContent !== text) el.textContent = text;
  }

  // One cell, by the same rules as the server's pages::cell.
  function cell(column, row) {
    const [key, , link] = column;
    const td = document.createElement('td');
    td.className = 'c-' + key;
    const text = cellText(key, row[key]);
    const sagaType = cellText('saga_type', row.saga_type);
    let href = null;
    if (link === 'instance' && text !== '' && sagaType !== '') {
      href = '/console/instances/' + enc(sagaType) + '/' + enc(text);
    } else if (link === 'action' && text !== '') {
      href = '/console/actions/' + enc(text);
    }
    if (href) {
      const a = document.createElement('a');
      a.setAttribute('href', href);
      a.textContent = text;
      td.appendChild(a);
    } else {
      td.textContent = text;
    }
    return td;
  }

  // Replaces a list table's rows (its columns are in data-columns).
  function fillTable(table, rows) {
    if (!table) return;
    const columns = JSON.parse(table.dataset.columns || '[]');
    const rowClass = table.dataset.rowClass || '';
    const tbody = document.createElement('tbody');
    if (rows.length === 0) {
      const tr = document.createElement('tr');
      tr.className = 'empty';
      const td = document.createElement('td');
      td.setAttribute('colspan', String(columns.length));
      td.textContent = table.dataset.empty || '';
      tr.appendChild(td);
      tbody.appendChild(tr);
    }
    for (const row of rows) {
      const tr = document.createElement('tr');
      if (rowClass) tr.className = rowClass + '-' + classText(row[rowClass]);
      for (const column of columns) tr.appendChild(cell(column, row));
      tbody.appendChild(tr);
    }
    const old = table.querySelector('tbody');
    if (old) table.replaceChild(tbody, old); else table.appendChild(tbody);
  }

  function byData(selector, name, value) {
    for (const el of document.querySelectorAll(selector)) {
      if (el.dataset[name] === value) return el;
    }
    return null;
  }

  async function getJson(url) {
    const response = await fetch(url, { credentials: 'same-origin', headers: { accept: 'application/json' } });
    if (response.status === 401) {
      window.location.assign('/console/login');
      throw new Error('logged out');
    }
    if (response.status === 403) {
      window.location.reload();
      throw new Error('forbidden');
    }
    if (!response.ok) throw new Error('HTTP ' + response.status);
    return response.json();
  }

  // Runs `refresh` every `ms` (one at a time), saying how it went.
  function poll(ms, refresh) {
    const status = document.getElementById('refresh');
    async function tick() {
      if (!document.hidden) {
        try {
          await refresh();
          if (status) status.textContent = 'Live: updated ' + new Date().toLocaleTimeString();
          body.dataset.refreshed = String((Number(body.dataset.refreshed) || 0) + 1);
        } catch (e) {
          if (status) status.textContent = 'Not updated: ' + e.message;
        }
      }
      window.setTimeout(tick, ms);
    }
    window.setTimeout(tick, ms);
  }

  let overviewTicks = 0;
  async function refreshOverview() {
    const o = await getJson('/console/api/overview');
    overviewTicks += 1;
    for (const saga of o.sagas) {
      const card = byData('article.saga', 'sagaType', saga.saga_type);
      if (!card) continue;
      const tbody = card.querySelector('table.counts tbody');
      for (const s of saga.states) {
        let tr = byData('article.saga tr[data-state]', 'state', s.state);
        if (!tr || !card.contains(tr)) {
          tr = document.createElement('tr');
          tr.dataset.state = s.state;
          const name = document.createElement('td');
          name.textContent = s.state;
          const count = document.createElement('td');
          count.className = 'count';
          tr.append(name, count);
          tbody.appendChild(tr);
        }
        const count = tr.querySelector('.count');
        if (count) count.textContent = String(s.count);
      }
      const total = card.querySelector('.total');
      if (total) total.textContent = String(saga.total);
      const parked = card.querySelector('td.parked');
      if (parked) parked.textContent = String(saga.parked);
      const chart = card.querySelector('img.chart');
      if (chart && overviewTicks % 5 === 0) chart.setAttribute('src', chart.dataset.src + '?t=' + Date.now());
    }
    for (const q of o.queues) {
      for (const tr of document.querySelectorAll('#queues tr[data-consumer]')) {
        if (tr.dataset.consumer !== q.consumer) continue;
        if (tr.classList.contains('problem')) {
          const td = tr.querySelector('td');
          if (td) td.textContent = q.problem || '';
        } else {
          const depth = tr.querySelector('.depth');
          const errors = tr.querySelector('.error-depth');
          if (depth) depth.textContent = q.depth === null ? '?' : String(q.depth);
          if (errors) errors.textContent = q.error_depth === null ? '?' : String(q.error_depth);
        }
      }
    }
    const outbox = document.getElementById('outbox');
    if (outbox) {
      outbox.querySelector('.unsent').textContent = String(o.outbox.unsent);
      const age = o.outbox.oldest_unsent_age_seconds;
      outbox.querySelector('.lag').textContent = age === null ? 'none' : age.toFixed(1) + ' s';
    }
    const cards = document.querySelectorAll('#health article.health');
    o.health.forEach((h, i) => {
      const card = cards[i];
      if (!card) return;
      card.className = 'card health status-' + h.status;
      card.querySelector('h3').textContent = h.source + ': ' + h.status;
      fillTable(card.querySelector('table.list'), h.checks);
    });
    fillTable(document.getElementById('parked'), o.parked);
    setText('at', o.at);
  }

  async function refreshInstances() {
    const list = await getJson('/console/api/instances' + window.location.search);
    fillTable(document.getElementById('instances'), list.items);
    setText('page', 'page ' + list.page + ' of ' + list.pages + ' (' + list.total + ' in all)');
  }

  async function refreshInstance() {
    const url = '/console/api/instances/' + enc(body.dataset.sagaType) + '/' + enc(body.dataset.correlationId);
    const d = await getJson(url);
    setText('state', d.state);
    setText('state-entered-at', d.state_entered_at);
    setText('attempts', String(d.attempts));
    setText('last-error', d.last_error);
    setText('version', String(d.version));
    setText('updated-at', d.updated_at);
    const flag = document.getElementById('parked-flag');
    if (flag) flag.hidden = !d.parked;
    const resume = document.getElementById('resume-form');
    if (resume) resume.hidden = !d.parked;
    const diagram = document.getElementById('diagram');
    if (diagram) {
      diagram.classList.toggle('parked', d.parked);
      for (const g of diagram.querySelectorAll('g.state')) {
        g.classList.toggle('current', g.dataset.state === d.state);
      }
    }
    fillTable(document.getElementById('journal'), d.journal);
    fillTable(document.getElementById('timers'), d.timers);
    fillTable(document.getElementById('outbox'), d.outbox);
    fillTable(document.getElementById('actions'), d.actions);
    setText('data', d.data);
  }

  async function refreshActions() {
    const list = await getJson('/console/api/actions' + window.location.search);
    fillTable(document.getElementById('actions'), list.items);
    setText('page', 'page ' + list.page + ' of ' + list.pages + ' (' + list.total + ' in all)');
  }

  switch (body.dataset.page) {
    case 'overview': poll(OVERVIEW_POLL_MS, refreshOverview); break;
    case 'instances': poll(POLL_MS, refreshInstances); break;
    case 'instance': poll(POLL_MS, refreshInstance); break;
    case 'actions': poll(POLL_MS, refreshActions); break;
    default: break;
  }
}());
